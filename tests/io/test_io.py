"""Volumes and dataset discovery: geometry round trips and one clear error per malformed input."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.errors import DatasetError
from autoseg.io.dataset import (
    check_case_geometry,
    discover_cases,
    discover_inputs,
    load_dataset_json,
    load_label,
    parse_dataset_json,
)
from autoseg.io.volume import Geometry, read_header, read_volume, write_volume
from tests.conftest import real_dataset

GEOM = Geometry(
    shape=(4, 5, 6),
    spacing_mm=(3.0, 0.5, 0.7),
    origin_mm=(10.0, -5.0, 2.5),
    direction=(0.0, 0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.0, 0.0),
)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_write_read_round_trip_keeps_geometry(tmp_path, ending):
    arr = np.arange(120, dtype=np.float32).reshape(4, 5, 6)
    path = write_volume(arr, GEOM, tmp_path / f"img{ending}")
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.array, arr)
    assert vol.geometry.shape == (4, 5, 6)
    np.testing.assert_allclose(vol.geometry.spacing_mm, GEOM.spacing_mm, rtol=1e-6)
    np.testing.assert_allclose(vol.geometry.origin_mm, GEOM.origin_mm, atol=1e-5)
    np.testing.assert_allclose(vol.geometry.direction, GEOM.direction, atol=1e-6)
    # array axis 0 is the slowest physical axis: SimpleITK reports the reversed size
    assert sitk.ReadImage(str(path)).GetSize() == (6, 5, 4)
    assert [p.name for p in tmp_path.iterdir()] == [f"img{ending}"]  # no temporary left behind


def _write(path: Path, arr, spacing=(1.0, 1.0, 1.0)):
    g = Geometry(arr.shape, spacing, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return write_volume(np.asarray(arr), g, path)


def _dataset(root: Path, n=2, channels=2, label_dtype=np.uint8):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    spec = {
        "channel_names": {str(c): f"MR{c}" for c in range(channels)},
        "labels": {"background": 0, "a": 1},
        "numTraining": n,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    for i in range(n):
        for c in range(channels):
            _write(
                root / "imagesTr" / f"case{i}_{c:04d}.nii.gz",
                np.random.default_rng(i).random((4, 5, 6), dtype=np.float32),
            )
        lab = np.zeros((4, 5, 6), label_dtype)
        lab[1:3, 1:3, 1:3] = 1
        _write(root / "labelsTr" / f"case{i}.nii.gz", lab)
    return root


def test_discover_cases_pairs_channels_and_labels(tmp_path):
    root = _dataset(tmp_path / "ds")
    cases = discover_cases(root)
    assert [c.case_id for c in cases] == ["case0", "case1"]
    assert [p.name for p in cases[0].images] == ["case0_0000.nii.gz", "case0_0001.nii.gz"]
    assert cases[1].label.name == "case1.nii.gz"


@pytest.mark.parametrize(
    "raw, message",
    [
        ([], "top level must be a JSON object"),
        ({"labels": {"background": 0}, "file_ending": ".nii.gz"}, "required key 'channel_names' is missing"),
        (
            {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 2}, "file_ending": ".nii.gz"},
            "consecutive integers from 0",
        ),
        (
            {"channel_names": {"0": "CT"}, "labels": {"a": 1}, "file_ending": ".nii.gz"},
            "background with value 0",
        ),
        (
            {"channel_names": {"1": "CT"}, "labels": {"background": 0}, "file_ending": ".nii.gz"},
            "without gaps",
        ),
        (
            {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1.5}, "file_ending": ".nii.gz"},
            "must be integers",
        ),
        ({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "file_ending": ".png"}, "not supported"),
    ],
)
def test_dataset_json_errors_are_one_clear_line(raw, message):
    with pytest.raises(DatasetError, match=message) as exc:
        parse_dataset_json(raw, "x/dataset.json")
    assert "\n" not in str(exc.value) and str(exc.value).startswith("x/dataset.json")


def test_dataset_json_not_json(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"dataset.json: not valid JSON"):
        load_dataset_json(tmp_path)


def test_missing_channel_missing_label_and_stray_file(tmp_path):
    root = _dataset(tmp_path / "a")
    (root / "imagesTr" / "case1_0001.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case 'case1' is missing channel file\(s\) case1_0001.nii.gz"):
        discover_cases(root)
    root = _dataset(tmp_path / "b")
    (root / "labelsTr" / "case0.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case0.nii.gz: label file missing for case 'case0'"):
        discover_cases(root)
    root = _dataset(tmp_path / "c")
    (root / "imagesTr" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"notes.txt: unexpected file"):
        discover_cases(root)


def test_zero_byte_truncated_and_non_image_files(tmp_path):
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty.nii.gz: file is empty"):
        read_volume(empty)
    good = _write(tmp_path / "good.nii.gz", np.ones((8, 8, 8), np.float32))
    data = good.read_bytes()
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"trunc.nii.gz: truncated or corrupt"):
        read_volume(trunc)
    text = tmp_path / "text.nii.gz"
    text.write_bytes(gzip.compress(b"this is not an image"))
    with pytest.raises(DatasetError, match=r"text.nii.gz: not a readable image"):
        read_header(text)


def test_2d_image_and_absurd_spacing_are_rejected(tmp_path):
    img2d = sitk.GetImageFromArray(np.zeros((5, 6), np.float32))
    sitk.WriteImage(img2d, str(tmp_path / "flat.nii.gz"))
    with pytest.raises(DatasetError, match=r"flat.nii.gz: is 2D"):
        read_volume(tmp_path / "flat.nii.gz")
    img = sitk.GetImageFromArray(np.zeros((5, 6, 7), np.float32))
    img.SetSpacing((1.0, 1.0, 250.0))
    sitk.WriteImage(img, str(tmp_path / "thick.nii.gz"))
    with pytest.raises(DatasetError, match=r"thick.nii.gz: implausible voxel spacing"):
        read_header(tmp_path / "thick.nii.gz")


def test_mismatched_shape_and_spacing_name_the_file(tmp_path):
    root = _dataset(tmp_path / "a")
    _write(root / "labelsTr" / "case0.nii.gz", np.zeros((4, 5, 7), np.uint8))
    case = discover_cases(root)[0]
    with pytest.raises(DatasetError, match=r"case0.nii.gz: shape \(4, 5, 7\) differs from case0_0000.nii.gz"):
        check_case_geometry(case)
    root = _dataset(tmp_path / "b")
    _write(root / "imagesTr" / "case0_0001.nii.gz", np.zeros((4, 5, 6), np.float32), spacing=(2.0, 1.0, 1.0))
    with pytest.raises(DatasetError, match=r"case0_0001.nii.gz: spacing .* differs"):
        check_case_geometry(discover_cases(root)[0])


def test_label_values_float_integral_accepted_others_rejected(tmp_path):
    f = _write(tmp_path / "f.nii.gz", np.array([[[0.0, 1.0], [1.0, 0.0]]], np.float32))
    arr, _ = load_label(f, {0, 1})
    assert arr.dtype == np.uint8 and arr.sum() == 2
    g = _write(tmp_path / "g.nii.gz", np.array([[[0.0, 0.5], [1.0, 0.0]]], np.float32))
    with pytest.raises(DatasetError, match=r"g.nii.gz: label map has non-integer values"):
        load_label(g, {0, 1})
    h = _write(tmp_path / "h.nii.gz", np.array([[[0, 3], [1, 0]]], np.uint8))
    with pytest.raises(DatasetError, match=r"h.nii.gz: label values \[3\] are not declared"):
        load_label(h, {0, 1})


def test_discover_inputs_folder_and_single_file(tmp_path):
    root = _dataset(tmp_path / "ds", channels=1)
    cases = discover_inputs(root / "imagesTr", 1)
    assert [c.case_id for c in cases] == ["case0", "case1"]
    one = discover_inputs(root / "imagesTr" / "case1_0000.nii.gz", 1)
    assert one[0].case_id == "case1"
    with pytest.raises(DatasetError, match="channel 0, but|lacks channel"):
        discover_inputs(root / "imagesTr", 2)


@pytest.mark.realdata
def test_real_float_labels_and_psr_orientation():
    """Dataset003: label files stored as float32 load as integers; the PSR case keeps its direction."""
    root = real_dataset("Dataset003_SpinalCordTiny")
    cases = {c.case_id: c for c in discover_cases(root)}
    assert len(cases) == 5
    geom = check_case_geometry(cases["sct_errsm30_t2w"])
    direction = np.array(geom.direction).reshape(3, 3)
    assert not np.allclose(direction, np.eye(3))  # PSR, not the identity
    for c in cases.values():
        arr, _ = load_label(c.label, {0, 1})
        assert set(np.unique(arr)) == {0, 1}


@pytest.mark.realdata
def test_real_dataset_with_a_missing_label_is_reported(tmp_path):
    src = real_dataset("Dataset003_SpinalCordTiny")
    dst = tmp_path / "ds"
    shutil.copytree(src, dst, symlinks=True)
    (dst / "labelsTr" / "sct_errsm30_t1w.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"sct_errsm30_t1w.nii.gz: label file missing"):
        discover_cases(dst)


def test_region_syntax_and_ignore_label_round_trip():
    raw = {
        "channel_names": {"0": "FLAIR", "1": "T1c"},
        "labels": {
            "background": 0,
            "whole_tumor": [1, 2, 3, 4],
            "tumor_core": [1, 3, 4],
            "enhancing": 4,
            "ignore": 5,
        },
        "regions_class_order": [2, 1, 4],
        "file_ending": ".nii.gz",
    }
    spec = parse_dataset_json(raw)
    assert spec.region_based and spec.regions_class_order == (2, 1, 4)
    assert spec.regions == {"whole_tumor": (1, 2, 3, 4), "tumor_core": (1, 3, 4), "enhancing": (4,)}
    assert spec.ignore_label == 5 and spec.allowed_values == {0, 1, 2, 3, 4, 5}
    assert spec.foreground_values == [1, 2, 3, 4] and spec.num_classes == 5
    assert parse_dataset_json(spec.to_json()) == spec
    with pytest.raises(DatasetError, match="need 'regions_class_order'"):
        parse_dataset_json({**raw, "regions_class_order": [1]})
    with pytest.raises(DatasetError, match="'ignore' label \\(3\\) must have the largest value"):
        parse_dataset_json(
            {
                **raw,
                "labels": {"background": 0, "a": [1], "b": [4], "ignore": 3},
                "regions_class_order": [1, 4],
            }
        )
    plain = parse_dataset_json(
        {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "a": 1, "ignore": 2},
            "file_ending": ".nii.gz",
        }
    )
    assert plain.ignore_label == 2 and plain.num_classes == 2 and plain.foreground_labels == {"a": 1}
