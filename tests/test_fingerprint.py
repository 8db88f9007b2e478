"""Fingerprint on hand-made volumes: every number below is worked out on paper from the arrays written here.

Dataset (two channels, labels ``a`` = 1 and ``b`` = 2), arrays in ``(z, y, x)`` order:

* ``lps``: stored in LPS (identity direction), shape 6×8×10, spacing 3×1×0.5 mm. Both channels are zero except
  in the box z 1:5, y 2:6, x 3:9 (4×4×6 = 96 voxels), so the crop keeps 96 / 480 = 0.2 of the volume.
  Label ``a``: two 2×2×2 cubes, z 1:3 y 2:4 x 3:5 and z 3:5 y 4:6 x 6:8, separated by the empty x = 5 plane:
  16 voxels, 2 components. Label ``b``: voxels (1, 5, 8) and (2, 4, 7), which touch only at a corner:
  2 voxels, 1 component under full (26-) connectivity.
* ``spl``: the same case stored transposed (array axes x, y, z, spacing 0.5×1×3 mm) with a direction whose
  index axes point S, P, L. Reoriented to LPS it is ``lps`` again, so spacing, shapes and counts are the same;
  only the stored orientation differs.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest

from autoseg import api
from autoseg.fingerprint import (
    FINGERPRINT_SCHEMA_VERSION,
    Fingerprint,
    compute_fingerprint,
    count_components,
    dataset_hash,
)
from autoseg.io.dataset import discover_cases, load_dataset_json
from autoseg.io.volume import Geometry, write_volume
from autoseg.jsonio import read_json, write_json
from autoseg.layout import WorkDir

SPACING_MM = (3.0, 1.0, 0.5)
SHAPE = (6, 8, 10)
BOX = (slice(1, 5), slice(2, 6), slice(3, 9))
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# columns: index axis i -> physical z (S), j -> y (P), k -> x (L); symmetric, so row-major is the same
SPL = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)


def hand_made_case() -> tuple[np.ndarray, np.ndarray]:
    """``(image (2, Z, Y, X) float32, label (Z, Y, X) uint8)`` as described in the module docstring."""
    image = np.zeros((2, *SHAPE), dtype=np.float32)
    box = np.arange(1, 97, dtype=np.float32).reshape(4, 4, 6)  # distinct nonzero values
    image[0][BOX] = box
    image[1][BOX] = 1000.0 - 3.0 * box
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[1:3, 2:4, 3:5] = 1
    label[3:5, 4:6, 6:8] = 1
    label[1, 5, 8] = 2
    label[2, 4, 7] = 2
    return image, label


def write_hand_made_dataset(root: Path) -> Path:
    image, label = hand_made_case()
    lps = Geometry(SHAPE, SPACING_MM, (10.0, -5.0, 2.0), IDENTITY)
    spl = Geometry(SHAPE[::-1], SPACING_MM[::-1], (10.0, -5.0, 2.0), SPL)
    for case_id, geom, transpose in (("lps", lps, (0, 1, 2)), ("spl", spl, (2, 1, 0))):
        for c in range(2):
            write_volume(
                np.ascontiguousarray(image[c].transpose(transpose)),
                geom,
                root / "imagesTr" / f"{case_id}_{c:04d}.nii.gz",
            )
        write_volume(
            np.ascontiguousarray(label.transpose(transpose)), geom, root / "labelsTr" / f"{case_id}.nii.gz"
        )
    spec = {
        "channel_names": {"0": "MRI", "1": "MRI2"},
        "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": 2,
        "file_ending": ".nii.gz",
        "name": "HandMade",
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


@pytest.fixture
def hand_made(tmp_path) -> Path:
    return write_hand_made_dataset(tmp_path / "Dataset901_HandMade")


def fingerprint_of(root: Path, workers: int = 1, samples_per_case: int = 10_000) -> Fingerprint:
    spec = load_dataset_json(root)
    return compute_fingerprint(
        discover_cases(root, spec), spec, workers=workers, samples_per_case=samples_per_case
    )


def test_per_case_fields_worked_out_by_hand(hand_made):
    fp = fingerprint_of(hand_made)
    assert fp.schema_version == FINGERPRINT_SCHEMA_VERSION == 3
    assert [c.case_id for c in fp.cases] == ["lps", "spl"]
    for case in fp.cases:
        assert case.spacing_mm == pytest.approx(SPACING_MM)  # canonical (LPS) array order for both
        assert case.shape_before_crop == (6, 8, 10)
        assert case.shape_after_crop == (4, 4, 6)
        assert case.crop_fraction_kept == pytest.approx(96 / 480)
        assert case.label_voxels == {"a": 16, "b": 2}
        assert case.label_components == {"a": 2, "b": 1}
        # 'a': two 2x2x2 blocks, 'b': two voxels touching at a corner; every voxel lies on the surface, nearest
        # outside voxel along the 0.5 mm axis: 2 * 0.5 - 0.5 mm
        assert case.structure_thickness_mm == {"a": 0.5, "b": 0.5}
    assert [c.orientation for c in fp.cases] == ["LPS", "SPL"]


def test_label_absent_from_a_case_has_zero_voxels_and_components(tmp_path):
    root = write_hand_made_dataset(tmp_path / "Dataset902_NoB")
    _, label = hand_made_case()
    label[label == 2] = 0
    write_volume(
        label, Geometry(SHAPE, SPACING_MM, (10.0, -5.0, 2.0), IDENTITY), root / "labelsTr" / "lps.nii.gz"
    )
    case = fingerprint_of(root).cases[0]
    assert case.label_voxels == {"a": 16, "b": 0}
    assert case.label_components == {"a": 2, "b": 0}


def test_count_components_uses_full_connectivity():
    mask = np.zeros((5, 5, 5), dtype=bool)
    assert count_components(mask) == 0
    mask[0, 0, 0] = mask[1, 1, 1] = True  # corner contact: one component with 26 neighbours (two with 6)
    assert count_components(mask) == 1
    mask[3:5, 3:5, 3:5] = True  # a cube two voxels away along every axis
    assert count_components(mask) == 2
    assert count_components(np.eye(4, dtype=bool)) == 1  # 2D: diagonal pixels touch (8 neighbours)


def test_intensity_stats_equal_numpy_on_foreground_voxels(hand_made):
    """Below the sampling cap every foreground voxel is used, so the stats are numpy's on those voxels."""
    fp = fingerprint_of(hand_made)
    image, label = hand_made_case()
    for c, stats in enumerate(fp.intensity):
        # both cases hold the same voxels, so the pooled values are each foreground value twice
        v = np.concatenate([image[c][label > 0]] * 2).astype(np.float64)
        assert v.size == 36
        assert stats.mean == pytest.approx(v.mean())
        assert stats.std == pytest.approx(v.std())
        assert stats.median == pytest.approx(np.median(v))
        assert stats.min == v.min() and stats.max == v.max()
        assert stats.percentile_00_5 == pytest.approx(np.percentile(v, 0.5))
        assert stats.percentile_99_5 == pytest.approx(np.percentile(v, 99.5))
    # channel 0 by hand: the box value at (z, y, x) is 1 + 24 (z - 1) + 6 (y - 2) + (x - 3)
    assert fp.intensity[0].min == 1.0  # (1, 2, 3), a corner of the first cube of label a
    assert fp.intensity[0].max == 1 + 24 * 3 + 6 * 3 + 4  # (4, 5, 7), a corner of the second cube


def test_sampling_above_the_cap_is_seeded(hand_made):
    a = fingerprint_of(hand_made, samples_per_case=5)
    b = fingerprint_of(hand_made, samples_per_case=5)
    assert a == b
    assert a.intensity != fingerprint_of(hand_made).intensity  # 10 of 36 values give other stats


def test_deterministic_and_independent_of_workers(hand_made):
    one = fingerprint_of(hand_made, workers=1)
    assert fingerprint_of(hand_made, workers=1) == one
    assert fingerprint_of(hand_made, workers=2) == one


def test_json_round_trip(hand_made):
    fp = fingerprint_of(hand_made)
    assert Fingerprint.from_json(json.loads(json.dumps(fp.to_json()))) == fp


def _counting_compute(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = api.compute_fingerprint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "compute_fingerprint", counting)
    return calls


def _hash(root: Path) -> str:
    spec = load_dataset_json(root)
    return dataset_hash(discover_cases(root, spec), spec)


def test_fingerprint_reused_unless_the_dataset_changes(hand_made, tmp_path, monkeypatch):
    work = WorkDir(tmp_path / "work")
    api.plan(hand_made, work.root, workers=1)
    first = read_json(work.fingerprint)
    assert first["dataset_hash"] == _hash(hand_made)

    calls = _counting_compute(monkeypatch)
    api.plan(hand_made, work.root, workers=1)
    assert calls == []  # unchanged dataset: reused
    assert read_json(work.fingerprint) == first

    # same size, newer mtime: stale
    label = hand_made / "labelsTr" / "lps.nii.gz"
    st = label.stat()
    os.utime(label, (st.st_atime, st.st_mtime + 10))
    api.plan(hand_made, work.root, workers=1)
    assert len(calls) == 1
    second = read_json(work.fingerprint)
    assert second["dataset_hash"] == _hash(hand_made) != first["dataset_hash"]

    # other size, same mtime: stale as well
    mtime = label.stat().st_mtime
    _, arr = hand_made_case()
    arr[0, 0, 0] = 1  # a third component of label a, and a file of another size
    write_volume(arr, Geometry(SHAPE, SPACING_MM, (10.0, -5.0, 2.0), IDENTITY), label)
    os.utime(label, (mtime, mtime))
    assert label.stat().st_size != st.st_size
    api.plan(hand_made, work.root, workers=1)
    assert len(calls) == 2
    third = Fingerprint.from_json(read_json(work.fingerprint))
    assert third.dataset_hash != second["dataset_hash"]
    assert third.cases[0].label_components == {"a": 3, "b": 1}

    api.plan(hand_made, work.root, workers=1)
    assert len(calls) == 2  # and reused again


def test_older_schema_fingerprint_is_recomputed(hand_made, tmp_path, monkeypatch):
    work = WorkDir(tmp_path / "work")
    api.plan(hand_made, work.root, workers=1)
    current = read_json(work.fingerprint)
    old = {**copy.deepcopy(current), "schema_version": 1}
    for case in old["cases"]:
        del case["orientation"], case["label_components"]
    write_json(work.fingerprint, old)

    calls = _counting_compute(monkeypatch)
    api.plan(hand_made, work.root, workers=1)
    assert calls == [1]
    assert read_json(work.fingerprint) == current

    # a current-schema file that is damaged is recomputed too, never half-read
    write_json(
        work.fingerprint,
        {"schema_version": FINGERPRINT_SCHEMA_VERSION, "dataset_hash": current["dataset_hash"]},
    )
    api.plan(hand_made, work.root, workers=1)
    assert calls == [1, 1]
    assert read_json(work.fingerprint) == current
