"""Hostile datasets, labels, JSON files and ``plan`` runs (issue 13), through the CLI.

Each refusal must exit 2 with exactly one ``error:`` line naming the file and no traceback, leave the input
unchanged and leave WORK exactly as it was found: absent if it was absent (with any parent folder plan would
have made), else the same files, sizes and mtimes and the same folders. Inputs are copies of a two-case,
two-channel phantom (56x72x27 voxels) so that every case runs in seconds without ../shared/data.
"""

from __future__ import annotations

import errno
import gzip
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.layout import WorkDir
from tests.test_bad_input import (  # noqa: F401 (trained_2d is a fixture)
    _array,
    _edit_json,
    _error_line,
    _listing,
    _rewrite,
    _run,
    trained_2d,
)

ENDING = ".nii.gz"


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """A two-case, two-channel phantom; read-only (tests copy it with :func:`_copy`)."""
    from autoseg.phantom import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("hostile") / "Dataset901_Hostile", n_cases=2, seed=0)


def _copy(tmp_path: Path, raw: Path) -> Path:
    return Path(shutil.copytree(raw, tmp_path / raw.name))


def _image(root: Path, case: int = 0, channel: int = 0) -> Path:
    return root / "imagesTr" / f"phantom_{case:03d}_{channel:04d}{ENDING}"


def _label(root: Path, case: int = 0) -> Path:
    return root / "labelsTr" / f"phantom_{case:03d}{ENDING}"


def _tree(folder: Path) -> dict[str, tuple[int, int] | str] | None:
    """Files (size, mtime) and folders under ``folder``; None if it does not exist (a file: its size, mtime)."""
    if not folder.exists() and not folder.is_symlink():
        return None
    if not folder.is_dir():
        return {"": (folder.stat().st_size, folder.stat().st_mtime_ns)}
    out: dict[str, tuple[int, int] | str] = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = "dir" if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
    return out


def _plan(capfd, root: Path, work: Path, *extra) -> tuple[int, str, str]:
    return _run(capfd, "plan", root, "--workdir", work, "--workers", "1", *extra)


def _refused(capfd, root: Path, work: Path, *extra, watch: Path | None = None) -> str:
    """``plan`` is refused: one error line, the dataset unchanged, WORK (or ``watch``, a folder above it that
    plan would have created) exactly as before."""
    watch = watch or work
    before_data, before_work = _listing(root), _tree(watch)
    code, _, err = _plan(capfd, root, work, *extra)
    line = _error_line(code, err)
    assert _listing(root) == before_data
    assert _tree(watch) == before_work
    return line


def _planned(capfd, root: Path, work: Path, *extra) -> WorkDir:
    code, _, err = _plan(capfd, root, work, *extra)
    assert code == 0, err
    assert "Traceback" not in err
    return WorkDir(work)


def _preprocessed_arrays(work: Path) -> list[np.ndarray]:
    arrays = [
        np.load(p) for p in sorted((work / "preprocessed").rglob("*.npy")) if not p.name.endswith("_seg.npy")
    ]
    assert arrays
    return arrays


def _patch_nifti_header(path: Path, fmt: str, offset: int, *values) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into(fmt, raw, offset, *values)
    path.write_bytes(gzip.compress(bytes(raw)))


# ------------------------------------------------------------------------ 1. finite but huge intensities


def test_huge_finite_intensities_plan_to_finite_arrays(tmp_path, capfd, raw):
    """float32 noise x 1e36 (finite: float32 holds 3.4e38) used to z-score to NaN (float32 sums overflow).
    Statistics are float64 now: the preprocessed arrays are finite and z-scored."""
    root = _copy(tmp_path, raw)
    rng = np.random.default_rng(0)
    for case in (0, 1):
        for channel in (0, 1):
            shape = _array(_image(root, case, channel)).shape
            _rewrite(_image(root, case, channel), (rng.standard_normal(shape) * 1e36).astype(np.float32))
    _planned(capfd, root, tmp_path / "work")
    for image in _preprocessed_arrays(tmp_path / "work"):
        assert np.isfinite(image).all()
        assert 0.5 < float(image.std()) < 2.0  # z-scored (then resampled), not collapsed or exploded
    fp = json.loads((tmp_path / "work" / "fingerprint.json").read_text())
    assert all(np.isfinite(v) for s in fp["intensity"] for v in s.values())


def test_normalisation_is_float64_exact():
    """``normalize_channel`` agrees with a float64 reference, for ordinary and for huge intensities."""
    from autoseg.planning.plans import ChannelNormalization
    from autoseg.preprocessing.normalize import normalize_channel

    rng = np.random.default_rng(1)
    for scale in (1.0, 1e36):
        x = (rng.standard_normal((6, 7, 8)) * scale + 3 * scale).astype(np.float32)
        ref = (x.astype(np.float64) - x.astype(np.float64).mean()) / x.astype(np.float64).std()
        out = normalize_channel(x, ChannelNormalization("zscore"))
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        mask = x > 3 * scale
        out = normalize_channel(x, ChannelNormalization("zscore", use_mask=True), mask)
        vals = x[mask].astype(np.float64)
        np.testing.assert_allclose(out[mask], (vals - vals.mean()) / vals.std(), rtol=1e-5, atol=1e-5)
        assert np.all(out[~mask] == 0)


def _int16_with_scale(root: Path) -> str:
    """int16 voxels with a NIfTI scl_slope of 1e38: every value but 0 overflows float32 once scaled."""
    path = _image(root)
    img = sitk.ReadImage(str(path))
    arr = np.clip(sitk.GetArrayFromImage(img), -1000, 1000).astype(np.int16)
    new = sitk.GetImageFromArray(arr)
    new.CopyInformation(img)
    sitk.WriteImage(new, str(path))
    _patch_nifti_header(path, "<ff", 112, 1e38, 0.0)  # scl_slope, scl_inter
    return f"{path}: "


def _float64_beyond_float32(root: Path) -> str:
    path = _image(root)
    _rewrite(path, _array(path).astype(np.float64) * 1e300)
    return f"{path}: "


@pytest.mark.parametrize(
    "mutate, expected",
    [
        pytest.param(_int16_with_scale, "once scaled by the NIfTI header (scl_slope 1e+38, scl_inter 0)", id="int16-scl_slope-1e38"),
        pytest.param(_float64_beyond_float32, "are beyond the 32-bit float range autoseg computes in (|value| <= 3.4e+38)", id="float64-1e300"),
    ],
)  # fmt: skip
def test_intensities_beyond_float32_are_refused(mutate, expected, tmp_path, capfd, raw):
    root = _copy(tmp_path, raw)
    name = mutate(root)
    line = _refused(capfd, root, tmp_path / "work")
    assert name in line and expected in line, line


def test_late_nonfinite_refusal_removes_what_plan_wrote(tmp_path, capfd, raw, monkeypatch):
    """A case whose normalised image is not finite is found only while preprocessing (after fingerprint,
    plans and gt_segmentations were written): plan refuses naming the file and removes all it wrote."""
    from autoseg.preprocessing import pipeline

    root = _copy(tmp_path, raw)
    real = pipeline.normalize
    work = tmp_path / "new" / "deeper" / "work"
    written = []  # what plan had written when the bad case was found

    def poisoned(image, norms, mask):
        out = real(image, norms, mask)
        if image.shape[1:] == _array(_image(root, 1)).shape:  # only the second case
            out[1, 0, 0, 0] = np.nan
            written.extend(sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()))
        return out

    assert _array(_image(root, 0)).shape != _array(_image(root, 1)).shape
    monkeypatch.setattr(pipeline, "normalize", poisoned)
    line = _refused(capfd, root, work, watch=tmp_path / "new")
    assert {"plans.json", "fingerprint.json", "dataset.json", f"gt_segmentations/phantom_001{ENDING}"} <= set(
        written
    )
    assert "preprocessed/fullres/phantom_000.npy" in written  # the first case was finished
    assert f"{_image(root, 1, 1)}: 1 voxel(s) are NaN/Inf once normalised (normalisation 'zscore')" in line
    assert not (tmp_path / "new").exists()

    # the same late refusal in a WORK planned before (``--clean`` sets the old data aside): all kept as found
    monkeypatch.setattr(pipeline, "normalize", real)
    work = tmp_path / "work"
    _planned(capfd, root, work)
    monkeypatch.setattr(pipeline, "normalize", poisoned)
    _refused(capfd, root, work, "--clean")


def test_predict_refuses_input_that_normalises_to_nan(
    trained_2d,  # noqa: F811 (the fixture imported from test_bad_input)
    phantom_dataset,
    tmp_path,
    capfd,
    monkeypatch,
):
    """The predict-time check: the normalised input is checked before the network sees it (which would
    predict all background from NaN, exit 0); the line names the channel's file and nothing is written."""
    from autoseg.preprocessing import pipeline

    inputs = tmp_path / "in"
    inputs.mkdir()
    for c in (0, 1):
        shutil.copyfile(
            phantom_dataset / "imagesTr" / f"phantom_000_{c:04d}{ENDING}", inputs / f"a_{c:04d}{ENDING}"
        )
    real = pipeline.normalize

    def poisoned(image, norms, mask):
        out = real(image, norms, mask)
        out[0] = np.inf
        return out

    monkeypatch.setattr(pipeline, "normalize", poisoned)
    before = _tree(trained_2d.root), _listing(inputs)
    code, _, err = _run(
        capfd, "predict", trained_2d.root, inputs, tmp_path / "out", "-c", "2d", "--folds", "all", "--device", "cpu",
        "--no-mirroring",
    )  # fmt: skip
    line = _error_line(code, err)
    assert (
        f"{inputs / f'a_0000{ENDING}'}: " in line
        and "NaN/Inf once normalised (normalisation 'zscore')" in line
    )
    assert not (tmp_path / "out").exists()
    assert (_tree(trained_2d.root), _listing(inputs)) == before


def test_train_stops_when_the_loss_is_not_finite(planned_phantom, tmp_path, capfd):
    """Preprocessed data holding NaN (e.g. from an older autoseg) makes the loss NaN: train exits 2 with one
    line instead of 'loss nan' and exit 0, and writes no final checkpoint."""
    work = WorkDir(tmp_path / "work")
    shutil.copytree(planned_phantom.root, work.root, ignore=shutil.ignore_patterns("results"))
    for npy in (work.root / "preprocessed").rglob("*.npy"):
        if not npy.name.endswith("_seg.npy"):
            arr = np.load(npy)
            np.save(npy, np.full_like(arr, np.nan))
    code, _, err = _run(
        capfd, "train", work.root, "2d", "all", "--epochs", "2", "--iters-per-epoch", "1", "--val-iters", "1",
        "--device", "cpu", "-j", "0",
    )  # fmt: skip
    line = _error_line(code, err)
    assert "the training loss became nan in epoch 1" in line, line
    assert str(work.fold_dir("2d", "all")) in line
    assert not (work.fold_dir("2d", "all") / "checkpoint_final.pt").exists()


# ------------------------------------------------------------------------------ 2. label values too large


def _labels(**changes):
    def edit(d: dict) -> None:
        d["labels"].update(changes)

    return edit


def _regions(d: dict) -> None:
    d["labels"] = {"background": 0, "whole": [1, 2], "core": [2, 70000]}
    d["regions_class_order"] = [1, 2]


def _region_order(d: dict) -> None:
    d["labels"] = {"background": 0, "whole": [1, 2], "core": [2]}
    d["regions_class_order"] = [1, 10**30]


LABEL_CASES = [
    ("label 10**30", _labels(lesion=10**30), "label 'lesion' has value about 1e+30; label values must be at most 32767"),
    ("label 1e30 float", _labels(lesion=1e30), "label 'lesion' has value about 1e+30; label values must be at most 32767"),
    ("ignore 40000", _labels(ignore=40000), "label 'ignore' has value 40000; label values must be at most 32767 (label maps are read as 16-bit integers)"),
    ("ignore 300", _labels(ignore=300), "label 'ignore' has value 300; training needs label values from 0 to 255"),
    ("region value 70000", _regions, "label 'core' lists value 70000; label values must be at most 32767"),
    ("regions_class_order 10**30", _region_order, "'regions_class_order' must list integers from 1 to 32767, got [1, about 1e+30]"),
]  # fmt: skip


@pytest.mark.parametrize(
    "edit, expected", [pytest.param(e, x, id=i.replace(" ", "-")) for i, e, x in LABEL_CASES]
)
def test_label_values_too_large_are_refused(edit, expected, tmp_path, capfd, raw):
    root = _copy(tmp_path, raw)
    _edit_json(root, edit)
    line = _refused(capfd, root, tmp_path / "work")
    assert f"{root / 'dataset.json'}: {expected}" in line, line


def test_label_map_value_beyond_range_is_refused(tmp_path, capfd, raw):
    """A float label map holding 1e30 was cast to int64 (with a RuntimeWarning) and reported as negative."""
    root = _copy(tmp_path, raw)
    arr = _array(_label(root)).astype(np.float32)
    arr.flat[0] = 1e30
    _rewrite(_label(root), arr)
    line = _refused(capfd, root, tmp_path / "work")
    assert f"{_label(root)}: label map has values ['1e+30'] beyond the label range" in line, line


# ---------------------------------------------------------------------------------------- 3. JSON files


def _write(text: str | bytes):
    def mutate(path: Path) -> None:
        path.unlink(missing_ok=True)
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)

    return mutate


NESTED = "[" * 100_000 + "]" * 100_000
DATASET_JSON_CASES = [
    ("nested arrays", _write(NESTED), "JSON nested too deeply to read"),
    ("nested objects", _write('{"a":' * 50_000 + "1" + "}" * 50_000), "JSON nested too deeply to read"),
    ("NaN literal", lambda p: p.write_text(p.read_text().replace('"numTraining": 2', '"numTraining": NaN')), "NaN is not valid JSON"),
    ("Infinity literal", lambda p: p.write_text(p.read_text().replace('"numTraining": 2', '"numTraining": -Infinity')), "-Infinity is not valid JSON"),
    ("a list", _write("[1, 2]"), "top level must be a JSON object"),
    ("null", _write("null"), "top level must be a JSON object"),
    ("not UTF-8", lambda p: p.write_bytes(p.read_text().replace("Phantom", "Fant\u00f4me").encode("latin-1")), "not UTF-8 text"),
    ("a folder", lambda p: (p.unlink(), p.mkdir()), "is a folder; dataset.json must be a file"),
    ("no foreground label", lambda p: _edit_json(p.parent, lambda d: d.update(labels={"background": 0, "ignore": 1})), "'labels' declares no foreground label (only background and ignore); there is nothing to segment"),
    ("duplicate key", lambda p: p.write_text(p.read_text().replace('"labels": {', '"labels": {"organ": 2, ', 1)), "key 'organ' appears twice in one object"),
]  # fmt: skip


@pytest.mark.parametrize(
    "mutate, expected", [pytest.param(m, x, id=i.replace(" ", "-")) for i, m, x in DATASET_JSON_CASES]
)
def test_plan_refuses_hostile_dataset_json(mutate, expected, tmp_path, capfd, raw):
    root = _copy(tmp_path, raw)
    mutate(root / "dataset.json")
    line = _refused(capfd, root, tmp_path / "work")
    assert f"{root / 'dataset.json'}: {expected}" in line, line


def test_huge_json_is_refused_before_decoding(tmp_path, capfd, raw, monkeypatch):
    from autoseg import jsonio

    root = _copy(tmp_path, raw)
    monkeypatch.setattr(jsonio, "MAX_JSON_BYTES", 256)
    line = _refused(capfd, root, tmp_path / "work")
    assert (
        f"{root / 'dataset.json'}: {(root / 'dataset.json').stat().st_size} bytes is too large for a JSON file autoseg reads (at most 256 bytes)"
        in line
    ), line


def test_json_with_a_byte_order_mark_is_read(tmp_path, capfd, raw):
    """A UTF-8 byte-order mark (Windows editors write one) is not an error."""
    root = _copy(tmp_path, raw)
    path = root / "dataset.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    _planned(capfd, root, tmp_path / "work")


def test_read_json_contract(tmp_path):
    from autoseg.jsonio import JSONFileError, read_json

    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    assert read_json(path, expect=list) == [1, 2]
    with pytest.raises(
        JSONFileError, match=r"x.json: expected an object \{...\} at the top level, got a list"
    ):
        read_json(path, expect=dict)
    path.write_text("{")
    with pytest.raises(json.JSONDecodeError):  # plain syntax errors stay what json.loads raises
        read_json(path)


@pytest.fixture
def shared_work(planned_phantom, tmp_path) -> WorkDir:
    """plans.json and dataset.json of the planned phantom, its preprocessed data linked (read-only)."""
    work = WorkDir(tmp_path / "work")
    work.root.mkdir()
    for f in (planned_phantom.plans, planned_phantom.dataset_json):
        shutil.copyfile(f, work.root / f.name)
    (work.root / "preprocessed").symlink_to(planned_phantom.root / "preprocessed")
    return work


SPLITS_CASES = [
    ("nested", NESTED, "JSON nested too deeply to read"),
    ("an object", '{"0": {"train": ["a"], "val": ["b"]}}', "expected a list [...] at the top level, got an object"),
    ("NaN", '[{"train": NaN, "val": []}]', "NaN is not valid JSON"),
    ("list of strings", '["phantom_000"]', "expected a list of folds like"),
    ("train not a list", '[{"train": "phantom_000", "val": []}]', "expected a list of folds like"),
    ("syntax", "[{", "not valid JSON (Expecting"),
]  # fmt: skip


@pytest.mark.parametrize(
    "text, expected", [pytest.param(t, x, id=i.replace(" ", "-")) for i, t, x in SPLITS_CASES]
)
def test_train_refuses_hostile_splits_json(text, expected, shared_work, capfd):
    shared_work.splits.write_text(text)
    before = _tree(shared_work.root)
    code, _, err = _run(
        capfd, "train", shared_work.root, "2d", "0", "--epochs", "1", "--device", "cpu", "-j", "0"
    )
    line = _error_line(code, err)
    assert f"{shared_work.splits}: {expected}" in line, line
    assert _tree(shared_work.root) == before


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param(NESTED, "JSON nested too deeply to read", id="nested"),
        pytest.param('{"schema_version": Infinity}', "Infinity is not valid JSON", id="Infinity"),
        pytest.param("[]", "top level must be a JSON object", id="a-list"),
    ],
)
def test_train_refuses_hostile_plans_json(text, expected, shared_work, capfd):
    shared_work.plans.write_text(text)
    before = _tree(shared_work.root)
    code, _, err = _run(
        capfd, "train", shared_work.root, "2d", "0", "--epochs", "1", "--device", "cpu", "-j", "0"
    )
    line = _error_line(code, err)
    assert f"{shared_work.plans}: {expected}" in line, line
    assert _tree(shared_work.root) == before


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param(NESTED, "JSON nested too deeply to read", id="nested"),
        pytest.param("[]", "invalid inference instructions (AttributeError", id="a-list"),
        pytest.param('{"configs": NaN}', "NaN is not valid JSON", id="NaN"),
    ],
)
def test_predict_refuses_hostile_inference_instructions(
    text, expected, shared_work, phantom_dataset, tmp_path, capfd
):
    shared_work.inference_instructions.write_text(text)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for c in (0, 1):
        shutil.copyfile(
            phantom_dataset / "imagesTr" / f"phantom_000_{c:04d}{ENDING}", inputs / f"a_{c:04d}{ENDING}"
        )
    before = _tree(shared_work.root)
    code, _, err = _run(capfd, "predict", shared_work.root, inputs, tmp_path / "out", "--device", "cpu")
    line = _error_line(code, err)
    assert f"{shared_work.inference_instructions}: {expected}" in line, line
    assert not (tmp_path / "out").exists() and _tree(shared_work.root) == before


def test_hostile_cached_fingerprint_is_recomputed(tmp_path, capfd, raw):
    """WORK/fingerprint.json is a cache: a nested one is recomputed, not an error."""
    root = _copy(tmp_path, raw)
    work = _planned(capfd, root, tmp_path / "work")
    good = json.loads(work.fingerprint.read_text())
    work.fingerprint.write_text(NESTED)
    _planned(capfd, root, work.root)
    assert json.loads(work.fingerprint.read_text()) == good


# ----------------------------------------------------------------------------- 4. volumes too small


def _resize_case(root: Path, case: int, shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(case)
    for path in (_image(root, case, 0), _image(root, case, 1), _label(root, case)):
        old = sitk.ReadImage(str(path))
        if path.parent.name == "labelsTr":
            arr = (np.arange(np.prod(shape)).reshape(shape) % 3).astype(np.uint8)
        else:
            arr = (rng.standard_normal(shape) + 5).astype(np.float32)
        new = sitk.GetImageFromArray(arr)
        new.SetSpacing(old.GetSpacing())
        new.SetOrigin(old.GetOrigin())
        new.SetDirection(old.GetDirection())
        sitk.WriteImage(new, str(path))


def test_volumes_too_small_to_pool_plan_a_network_that_trains(tmp_path, capfd, raw):
    """3x3x3 volumes: plan used to succeed with a one-stage network (no decoder), then train hit an
    IndexError. The patch now grows to 8 voxels on the finest axes (images are zero-padded to it, as a single
    small case always was), so the network pools once; a fold trains, validates and predicts."""
    root = _copy(tmp_path, raw)
    for case in (0, 1):
        _resize_case(root, case, (3, 3, 3))
    work = _planned(capfd, root, tmp_path / "work")
    plans = json.loads(work.plans.read_text())
    for name, config in plans["configurations"].items():
        assert len(config["network"]["strides"]) >= 2, name
        assert max(config["patch_size"]) == 8, name
    assert any("is too small to pool; patch grown to" in r for r in plans["reasons"])
    code, _, err = _run(
        capfd, "train", work.root, "3d_fullres", "0", "--epochs", "1", "--iters-per-epoch", "1",
        "--val-iters", "1", "--device", "cpu", "-j", "0", "--no-mirroring",
    )  # fmt: skip
    assert code == 0, err
    fold = work.fold_dir("3d_fullres", 0)
    assert (fold / "checkpoint_final.pt").is_file()
    predicted = sorted((fold / "validation").glob(f"*{ENDING}"))
    assert predicted and _array(predicted[0]).shape == (3, 3, 3)


@pytest.mark.parametrize("shape", [(3, 3, 3), (1, 72, 56)], ids=["one-case-3x3x3", "one-case-one-slice"])
def test_one_small_case_among_normal_ones_plans(shape, tmp_path, capfd, raw):
    """One small case does not make the dataset untrainable: patches are planned from the median shape and the
    sampler and sliding window pad smaller images (test_one_small_case_trains, marked slow, trains on them)."""
    root = _copy(tmp_path, raw)
    _resize_case(root, 0, shape)
    work = _planned(capfd, root, tmp_path / "work")
    for image in _preprocessed_arrays(work.root):
        assert np.isfinite(image).all()


@pytest.mark.slow
def test_one_small_case_trains(tmp_path, capfd, raw):
    root = _copy(tmp_path, raw)
    _resize_case(root, 0, (3, 3, 3))
    work = _planned(capfd, root, tmp_path / "work")
    from tests.conftest import shrink_network

    shrink_network(work)
    for config in ("2d", "3d_fullres"):
        code, _, err = _run(
            capfd, "train", work.root, config, "all", "--epochs", "1", "--iters-per-epoch", "1",
            "--val-iters", "1", "--device", "cpu", "-j", "0",
        )  # fmt: skip
        assert code == 0, err


def test_single_slice_volumes_plan(tmp_path, capfd, raw):
    """Volumes of one slice (2D-ish): in-plane pooling is enough for both configurations."""
    root = _copy(tmp_path, raw)
    for case in (0, 1):
        for path in (_image(root, case, 0), _image(root, case, 1), _label(root, case)):
            _rewrite(path, np.ascontiguousarray(_array(path)[13:14]))
    work = _planned(capfd, root, tmp_path / "work")
    plans = json.loads(work.plans.read_text())
    assert all(len(c["network"]["strides"]) >= 2 for c in plans["configurations"].values())


# ----------------------------------------------------------------------------------- 5. disk full


def _enospc_on_call(monkeypatch, n: int) -> list[int]:
    """``np.save`` writes a few bytes and raises ENOSPC from its ``n``-th call on."""
    real = np.save
    calls = [0]

    def save(file, arr, *args, **kwargs):
        calls[0] += 1
        if calls[0] < n:
            return real(file, arr, *args, **kwargs)
        Path(file).write_bytes(b"\x93NUMPY")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", save)
    return calls


def test_disk_full_while_preprocessing(tmp_path, capfd, raw, monkeypatch):
    root = _copy(tmp_path, raw)
    work = tmp_path / "work"
    calls = _enospc_on_call(monkeypatch, 3)  # the first case is written whole, the second is not
    line = _refused(capfd, root, work)
    assert calls[0] == 3
    assert f"{work / 'preprocessed'}" in line
    assert (
        "no space left on the disk (ENOSPC) while planning; nothing was kept; preprocessing needs about"
        in line
    )
    assert "GB are free" in line
    assert not work.exists()


def test_disk_full_in_a_worker_process(tmp_path, capfd, raw, monkeypatch):
    """The same with two worker processes (forked, so they inherit the failing writer): the refusal comes back
    from a worker, the other cases are not started, and WORK is removed once the pool has stopped."""
    root = _copy(tmp_path, raw)
    work = tmp_path / "work"
    _enospc_on_call(monkeypatch, 2)  # each worker's second array
    line = _refused(capfd, root, work, "--workers", "2")
    assert "no space left on the disk (ENOSPC) while planning; nothing was kept" in line
    assert not work.exists()


def test_disk_full_in_a_planned_work_keeps_it_as_found(tmp_path, capfd, raw, monkeypatch):
    root = _copy(tmp_path, raw)
    work = _planned(capfd, root, tmp_path / "work")
    _enospc_on_call(monkeypatch, 2)
    line = _refused(capfd, root, work.root, "--clean")
    assert "no space left on the disk (ENOSPC)" in line


# --------------------------------------------------------------- 6. a refused plan leaves nothing behind


def test_refused_plan_leaves_an_existing_empty_work_empty(tmp_path, capfd, raw):
    root = _copy(tmp_path, raw)
    arr = _array(_image(root, 1, 1))
    arr.flat[0] = np.nan  # found while fingerprinting, after the other case was read
    _rewrite(_image(root, 1, 1), arr)
    work = tmp_path / "work"
    work.mkdir()
    line = _refused(capfd, root, work)
    assert f"{_image(root, 1, 1)}: contains 1 NaN/Inf intensity value(s)" in line
    assert work.is_dir() and not any(work.iterdir())


def test_refused_replan_keeps_the_previous_plan(tmp_path, capfd, raw):
    """WORK planned for the dataset; then a case changes into one that is refused (found while
    fingerprinting): plans.json, fingerprint.json, gt_segmentations and preprocessed data stay as they were."""
    root = _copy(tmp_path, raw)
    work = _planned(capfd, root, tmp_path / "work")
    arr = _array(_image(root, 1, 0)).astype(np.float64) * 1e300
    _rewrite(_image(root, 1, 0), arr)
    line = _refused(capfd, root, work.root)
    assert "beyond the 32-bit float range" in line


# ----------------------------------------------------------------------------------- 7. beyond the list


def _broken_link(root: Path) -> str:
    link = root / "imagesTr" / f"ghost_0000{ENDING}"
    link.symlink_to(root / "nowhere.nii.gz")
    return f"{link}: broken symbolic link"


def _looping_link(root: Path) -> str:
    link = root / "labelsTr" / f"loop{ENDING}"
    link.symlink_to(link.name)
    return f"{link}: broken symbolic link (its target does not exist, or the link loops)"


def _folder_named_like_an_image(root: Path) -> str:
    for c in (0, 1):
        (root / "imagesTr" / f"dircase_{c:04d}{ENDING}").mkdir()
    shutil.copyfile(_label(root), root / "labelsTr" / f"dircase{ENDING}")
    _edit_json(root, lambda d: d.update(numTraining=3))
    return f"{root / 'imagesTr' / f'dircase_0000{ENDING}'}: not a regular file"


def _images_empty(root: Path) -> str:
    for sub in ("imagesTr", "labelsTr"):
        for p in (root / sub).iterdir():
            p.unlink()
    _edit_json(root, lambda d: d.pop("numTraining"))
    return f"{root / 'imagesTr'}: no images found with ending '.nii.gz'"


def _label_fourd(root: Path) -> str:
    arr = _array(_label(root))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([arr, arr]), isVector=False), str(_label(root)))
    return f"{_label(root)}: is 4D"


def _header_dim(index: int, value: int):
    def mutate(root: Path) -> str:
        _patch_nifti_header(_image(root), "<h", 40 + 2 * index, value)  # dim[index]
        return f"{_image(root)}: the NIfTI header gives 3 dimension(s) of sizes"

    return mutate


BEYOND_CASES = [
    ("NIfTI dim 0", _header_dim(1, 0)),
    ("NIfTI dim negative", _header_dim(2, -5)),
    ("broken symlink", _broken_link),
    ("symlink loop", _looping_link),
    ("folder named like an image", _folder_named_like_an_image),
    ("imagesTr empty", _images_empty),
    ("label map 4D", _label_fourd),
]


@pytest.mark.parametrize("mutate", [pytest.param(m, id=i.replace(" ", "-")) for i, m in BEYOND_CASES])
def test_plan_refuses_more_hostile_datasets(mutate, tmp_path, capfd, raw):
    root = _copy(tmp_path, raw)
    expected = mutate(root)
    line = _refused(capfd, root, tmp_path / "work")
    assert expected in line, line


def test_work_that_is_a_file_or_under_a_file(tmp_path, capfd, raw):
    root = _copy(tmp_path, raw)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    line = _refused(capfd, root, afile)
    assert f"{afile}: WORK exists and is not a folder" in line
    line = _refused(capfd, root, afile / "work", watch=afile)
    assert f"{afile / 'work'}: cannot create the WORK folder (Not a directory)" in line
    assert afile.read_text() == "mine"


def test_undo_restores_only_what_the_command_writes(tmp_path):
    """:class:`autoseg.undo.Undo`: kept files come back with their mtimes, a folder set aside comes back,
    new files in scope go, and files outside the scope (another command writing meanwhile) stay."""
    from autoseg.undo import Undo

    root = tmp_path / "work"
    (root / "preprocessed" / "a").mkdir(parents=True)
    (root / "preprocessed" / "a" / "x.npy").write_bytes(b"old data")
    (root / "plans.json").write_text("old plans")
    before = _tree(root)
    undo = Undo(root, scope=("plans.json", "preprocessed", "gt_segmentations"))
    undo.keep(root / "plans.json")
    (root / "plans.json").write_text("new plans, longer")
    undo.move_aside(root / "preprocessed")
    (root / "preprocessed" / "b").mkdir(parents=True)
    (root / "preprocessed" / "b" / "y.npy").write_bytes(b"new")
    (root / "gt_segmentations").mkdir()
    (root / "results").mkdir()
    (root / "results" / "training.log").write_text("someone else's")
    undo.rollback()
    after = _tree(root)
    assert after.pop("results") == "dir" and after.pop("results/training.log")[0] == len("someone else's")
    assert after == before

    fresh = tmp_path / "a" / "b" / "work"
    undo = Undo(fresh)
    fresh.mkdir(parents=True)
    (fresh / "plans.json").write_text("{}")
    undo.rollback()
    assert not (tmp_path / "a").exists()


def test_dataset_inside_a_folder_plan_rewrites_is_refused(tmp_path, capfd, raw):
    """WORK/preprocessed is set aside and deleted when the plans change: a dataset kept there would go too."""
    work = tmp_path / "work"
    root = Path(shutil.copytree(raw, work / "preprocessed" / raw.name))
    line = _refused(capfd, root, work)
    assert f"{root}: the dataset must not be inside {work / 'preprocessed'}, which plan rewrites" in line


def test_undo_commit_removes_copies_a_killed_run_left(tmp_path):
    """A plan killed outright (SIGKILL) leaves its kept copies; the next successful run removes exactly those
    names (``.<name>.<8 hex>.undo`` of what plan writes), nothing else."""
    from autoseg.undo import Undo

    root = tmp_path / "work"
    (root / ".preprocessed.0123abcd.undo" / "fullres").mkdir(parents=True)
    (root / ".plans.json.0123abcd.undo").write_text("old")
    (root / "gt_segmentations").mkdir()
    (root / "gt_segmentations" / ".a.nii.gz.89abcdef.undo").write_text("old")
    (root / ".notes.0123abcd.undo").write_text("the user's")
    (root / "gt_segmentations" / ".a.nii.gz.undo").write_text("the user's too")
    Undo(root, scope=("plans.json", "preprocessed", "gt_segmentations")).commit()
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
        ".notes.0123abcd.undo",
        "gt_segmentations",
        "gt_segmentations/.a.nii.gz.undo",
    ]


@pytest.mark.parametrize(
    "extra, expected",
    [
        pytest.param(("--gpu-memory", "0.5"), "--gpu-memory 0.5", id="gpu-memory-0.5"),
        pytest.param(("--device", "tpu"), "--device tpu", id="device-tpu"),
    ],
)
def test_refused_option_creates_no_work(extra, expected, tmp_path, capfd, raw):
    """An option refused before anything is read: WORK (and its parents) never appear."""
    root = _copy(tmp_path, raw)
    line = _refused(capfd, root, tmp_path / "a" / "work", *extra, watch=tmp_path / "a")
    assert expected in line, line
