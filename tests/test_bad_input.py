"""Every kind of bad input, through the CLI, in one place.

Each case must end with exit code 2 and exactly one line ``error: ...`` on stderr (file-descriptor level, so
ITK's own warnings count too) that names the file or folder and the problem, with no traceback; nothing may be
written (no ``WORK/plans.json``, no prediction folder) and the input folder must be unchanged (names, sizes and
mtimes). Datasets are copies of two small real spinal-cord cases (``Dataset003_SpinalCordTiny``, skipped where
``../shared/data`` is absent) or of a two-case phantom (for two-channel problems).
"""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.cli import main
from autoseg.layout import WorkDir
from tests.conftest import real_dataset

ENDING = ".nii.gz"
# the first has float32 labels with whole-number values (a real-world quirk that must be accepted)
SPINAL_CASES = ("ivado_unf01_t2w", "sct_errsm30_t2w")

# --------------------------------------------------------------------------------------------- helpers


def _run(capfd, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime (nanoseconds); empty if the folder is absent."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _error_line(code: int, err: str) -> str:
    """The one ``error:`` line of a failed command (exit 2, no traceback, nothing else on stderr but
    informational ``note:`` lines, e.g. which configurations predict uses; progress bars are off when stderr
    is not a terminal)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note: ")]
    assert code == 2, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def _spinal(tmp_path: Path) -> Path:
    """Two real spinal-cord cases (one float-labelled, one uint8-labelled) with a matching dataset.json."""
    src = real_dataset("Dataset003_SpinalCordTiny")
    root = tmp_path / "Dataset003_SpinalCordTiny"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for case in SPINAL_CASES:  # copyfile: the shared files are read-only, the copies must be editable
        shutil.copyfile(src / "imagesTr" / f"{case}_0000{ENDING}", root / "imagesTr" / f"{case}_0000{ENDING}")
        shutil.copyfile(src / "labelsTr" / f"{case}{ENDING}", root / "labelsTr" / f"{case}{ENDING}")
    spec = json.loads((src / "dataset.json").read_text())
    spec["numTraining"] = len(SPINAL_CASES)
    (root / "dataset.json").write_text(json.dumps(spec, indent=2))
    return root


@pytest.fixture(scope="module")
def phantom_raw(tmp_path_factory) -> Path:
    """A two-case, two-channel phantom dataset; treat as read-only (tests copy it with :func:`_phantom`)."""
    from autoseg.phantom import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("phantom2") / "Dataset900_Phantom", n_cases=2, seed=0)


def _phantom(tmp_path: Path, source: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / source.name))


def _image(root: Path, case: int = 0, channel: int = 0) -> Path:
    return sorted((root / "imagesTr").glob(f"*_{channel:04d}{ENDING}"))[case]


def _label(root: Path, case: int = 0) -> Path:
    return sorted((root / "labelsTr").iterdir())[case]


def _edit_json(root: Path, edit: Callable[[dict], None]) -> None:
    path = root / "dataset.json"
    spec = json.loads(path.read_text())
    edit(spec)
    path.write_text(json.dumps(spec))


def _rewrite(
    path: Path,
    array: np.ndarray | None = None,
    *,
    spacing: tuple | None = None,
    origin: tuple | None = None,
    direction: tuple | None = None,
    is_vector: bool = False,
) -> sitk.Image:
    """Rewrite ``path`` with a new array and/or geometry (SimpleITK order); unchanged parts are kept."""
    old = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(old) if array is None else array
    new = sitk.GetImageFromArray(arr, isVector=is_vector)
    if new.GetDimension() == old.GetDimension():
        new.SetSpacing(old.GetSpacing())
        new.SetOrigin(old.GetOrigin())
        new.SetDirection(old.GetDirection())
    if spacing is not None:
        new.SetSpacing(spacing)
    if origin is not None:
        new.SetOrigin(origin)
    if direction is not None:
        new.SetDirection(direction)
    sitk.WriteImage(new, str(path))
    return old


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _patch_pixdim(path: Path, axis: int, value: float) -> None:
    """Write ``value`` into NIfTI-1 ``pixdim[axis]`` (1 = x), bypassing writers that refuse absurd spacings."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<f", raw, 76 + 4 * axis, value)
    path.write_bytes(gzip.compress(bytes(raw)))


# ------------------------------------------------------------------------------------- the issue matrix
# Each mutation edits a fresh copy of a base dataset and returns the message fragment the user must see.


def _no_dataset_json(root: Path) -> str:
    (root / "dataset.json").unlink()
    return f"{root / 'dataset.json'}: dataset.json not found"


def _not_json(root: Path) -> str:
    (root / "dataset.json").write_text('{"labels": {"background": 0,')
    return f"{root / 'dataset.json'}: not valid JSON (Expecting property name"


def _drop_key(key: str) -> Callable[[Path], str]:
    def mutate(root: Path) -> str:
        _edit_json(root, lambda d: d.pop(key))
        return f"{root / 'dataset.json'}: required key '{key}' is missing"

    return mutate


def _labels_with_gap(root: Path) -> str:
    def edit(d: dict) -> None:
        d["labels"] = {"background": 0, **{k: v + 1 for k, v in d["labels"].items() if v}}

    _edit_json(root, edit)
    return "label values must be consecutive integers from 0, got [0, 2"


def _no_background(root: Path) -> str:
    _edit_json(root, lambda d: d["labels"].pop("background"))
    return f"{root / 'dataset.json'}: 'labels' must contain background with value 0"


def _empty_channel_names(root: Path) -> str:
    _edit_json(root, lambda d: d.update(channel_names={}))
    return f'{root / "dataset.json"}: \'channel_names\' must be a non-empty object like {{"0": "CT"}}'


def _channel_names_gap(root: Path) -> str:
    _edit_json(root, lambda d: d.update(channel_names={"0": "MRI", "2": "T2"}))
    return f"{root / 'dataset.json'}: 'channel_names' keys must be 0..1 without gaps, got [0, 2]"


def _num_training_wrong(root: Path) -> str:
    _edit_json(root, lambda d: d.update(numTraining=7))
    return f"{root / 'dataset.json'}: numTraining is 7 but imagesTr holds 2 case(s)"


def _unsupported_ending(root: Path) -> str:
    _edit_json(root, lambda d: d.update(file_ending=".png"))
    return "file_ending '.png' is not supported (use one of .nii.gz, .nii, .mha, .nrrd, .nhdr, .mhd)"


def _channel_file_missing(root: Path) -> str:
    path = _image(root, 0, channel=1)
    path.unlink()
    case = path.name[: -len("_0001" + ENDING)]
    return f"{root / 'imagesTr'}: case '{case}' is missing channel file(s) {path.name}"


def _image_missing(root: Path) -> str:
    path = _image(root)
    path.unlink()
    return f"{_label(root)}: label without images (no {path.name} in imagesTr)"


def _label_missing(root: Path) -> str:
    path = _label(root)
    path.unlink()
    return f"{path}: label file missing for case '{path.name[: -len(ENDING)]}'"


def _stray_text_file(root: Path) -> str:
    (root / "imagesTr" / "notes.txt").write_text("scanned on a Tuesday")
    return f"{root / 'imagesTr' / 'notes.txt'}: unexpected file (dataset.json says file_ending is '.nii.gz')"


def _stray_image_name(root: Path) -> str:
    shutil.copyfile(_image(root), root / "imagesTr" / f"extra{ENDING}")
    return f"{root / 'imagesTr' / f'extra{ENDING}'}: name must be <case>_<channel as 4 digits>.nii.gz"


def _stray_label(root: Path) -> str:
    shutil.copyfile(_label(root), root / "labelsTr" / f"ghost{ENDING}")
    return f"{root / 'labelsTr' / f'ghost{ENDING}'}: label without images (no ghost_0000.nii.gz in imagesTr)"


def _channel_not_declared(root: Path) -> str:
    extra = _image(root).with_name(_image(root).name.replace("_0000", "_0009"))
    shutil.copyfile(_image(root), extra)
    return f"{extra}: channel 9 but dataset.json declares"


def _wrong_ending(root: Path) -> str:
    path = _image(root)
    other = path.with_name(path.name[: -len(ENDING)] + ".nii")
    sitk.WriteImage(sitk.ReadImage(str(path)), str(other))
    path.unlink()
    return f"{other}: unexpected file (dataset.json says file_ending is '.nii.gz')"


def _not_an_image(root: Path) -> str:
    path = _image(root)
    path.write_text("this is a radiology report, not an image\n" * 20)
    return f"{path}: not a readable image"


def _truncated(root: Path) -> str:
    path = _image(root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return f"{path}: truncated or corrupt"


def _zero_bytes_image(root: Path) -> str:
    _image(root).write_bytes(b"")
    return f"{_image(root)}: file is empty (0 bytes)"


def _zero_bytes_label(root: Path) -> str:
    _label(root).write_bytes(b"")
    return f"{_label(root)}: file is empty (0 bytes)"


def _label_shape(root: Path) -> str:
    arr = _array(_label(root))
    _rewrite(_label(root), np.ascontiguousarray(arr[:, :, :-1]))
    return f"{_label(root)}: shape {arr[:, :, :-1].shape} differs from {_image(root).name} {arr.shape}"


def _channel_shape(root: Path) -> str:
    arr = _array(_image(root, 0, 1))
    _rewrite(_image(root, 0, 1), np.ascontiguousarray(arr[:-1]))
    return f"{_image(root, 0, 1)}: shape {arr[:-1].shape} differs from {_image(root).name} {arr.shape}"


def _label_spacing(root: Path) -> str:
    spacing = sitk.ReadImage(str(_label(root))).GetSpacing()
    _rewrite(_label(root), spacing=tuple(s * 1.5 for s in spacing))
    return f"{_label(root)}: spacing ("


def _channel_spacing(root: Path) -> str:
    spacing = sitk.ReadImage(str(_image(root, 0, 1))).GetSpacing()
    _rewrite(_image(root, 0, 1), spacing=tuple(s * 1.5 for s in spacing))
    return f"{_image(root, 0, 1)}: spacing ("


def _label_origin(root: Path) -> str:
    origin = sitk.ReadImage(str(_label(root))).GetOrigin()
    _rewrite(_label(root), origin=tuple(o + 5.0 for o in origin))
    return f"{_label(root)}: origin ("


def _label_direction(root: Path) -> str:
    direction = np.array(sitk.ReadImage(str(_label(root))).GetDirection()).reshape(3, 3)
    direction[:, 0] *= -1  # first axis flipped: same shape and spacing, mirrored anatomy
    _rewrite(_label(root), direction=tuple(direction.ravel()))
    return f"{_label(root)}: direction ("


def _label_undeclared(root: Path) -> str:
    arr = _array(_label(root))
    arr.flat[0] = 7
    _rewrite(_label(root), arr)
    return f"{_label(root)}: label values [7] are not declared in dataset.json labels"


def _label_fraction(root: Path) -> str:
    arr = _array(_label(root)).astype(np.float32)
    arr.flat[0] = 0.5
    _rewrite(_label(root), arr)
    return f"{_label(root)}: label map has non-integer values (e.g. [0.5])"


def _label_negative(root: Path) -> str:
    arr = _array(_label(root)).astype(np.int16)
    arr.flat[0] = -1
    _rewrite(_label(root), arr)
    return f"{_label(root)}: label map has negative values [-1]"


def _label_nan(root: Path) -> str:
    arr = _array(_label(root)).astype(np.float32)
    arr.flat[0] = np.nan
    _rewrite(_label(root), arr)
    return f"{_label(root)}: label map contains NaN or Inf"


def _intensity(value: float) -> Callable[[Path], str]:
    def mutate(root: Path) -> str:
        arr = _array(_image(root)).astype(np.float32)
        arr.flat[[0, 5]] = value
        _rewrite(_image(root), arr)
        return f"{_image(root)}: contains 2 NaN/Inf intensity value(s) (use --fix-nonfinite"

    return mutate


def _image_2d(root: Path) -> str:
    arr = _array(_image(root))
    _rewrite(_image(root), np.ascontiguousarray(arr[0]))
    return f"{_image(root)}: is 2D with shape {arr.shape[1:]}; expected a 3D volume"


def _image_4d(root: Path) -> str:
    arr = _array(_image(root))
    _rewrite(_image(root), np.stack([arr, arr]))
    return f"{_image(root)}: is 4D with shape {(2, *arr.shape)}; expected a 3D volume"


def _image_rgb(root: Path) -> str:
    arr = _array(_image(root)).astype(np.float32)
    _rewrite(_image(root), np.stack([arr] * 3, axis=-1), is_vector=True)
    return f"{_image(root)}: has 3 components per voxel; expected a scalar image"


def _spacing_header(value: float) -> Callable[[Path], str]:
    def mutate(root: Path) -> str:
        _patch_pixdim(_image(root), 1, value)
        return f"{_image(root)}: implausible voxel spacing"

    return mutate


def _spacing_huge(root: Path) -> str:
    spacing = sitk.ReadImage(str(_image(root))).GetSpacing()
    for path in (_image(root), _label(root)):
        _rewrite(path, spacing=(spacing[0], spacing[1], 150.0))
    return f"{_image(root)}: implausible voxel spacing (150, 1, 1) mm (must be in (0, 100])"


PLAN_CASES = [
    ("dataset.json missing", "spinal", _no_dataset_json),
    ("dataset.json not JSON", "spinal", _not_json),
    ("dataset.json without labels", "spinal", _drop_key("labels")),
    ("dataset.json without file_ending", "spinal", _drop_key("file_ending")),
    ("dataset.json without channel_names", "spinal", _drop_key("channel_names")),
    ("channel_names empty", "spinal", _empty_channel_names),
    ("channel_names with a gap", "phantom", _channel_names_gap),
    ("labels not consecutive", "spinal", _labels_with_gap),
    ("labels without background", "spinal", _no_background),
    ("numTraining wrong", "spinal", _num_training_wrong),
    ("file_ending unsupported", "spinal", _unsupported_ending),
    ("case missing a channel", "phantom", _channel_file_missing),
    ("case missing its image", "spinal", _image_missing),
    ("case missing its label", "spinal", _label_missing),
    ("stray text file", "spinal", _stray_text_file),
    ("stray image without channel suffix", "spinal", _stray_image_name),
    ("stray label without images", "spinal", _stray_label),
    ("channel not declared", "spinal", _channel_not_declared),
    ("wrong file ending", "spinal", _wrong_ending),
    ("not an image", "spinal", _not_an_image),
    ("truncated nii.gz", "spinal", _truncated),
    ("zero-byte image", "spinal", _zero_bytes_image),
    ("zero-byte label", "spinal", _zero_bytes_label),
    ("label shape differs", "spinal", _label_shape),
    ("channel shape differs", "phantom", _channel_shape),
    ("label spacing differs", "spinal", _label_spacing),
    ("channel spacing differs", "phantom", _channel_spacing),
    ("label origin differs", "spinal", _label_origin),
    ("label direction differs", "spinal", _label_direction),
    ("label value undeclared", "spinal", _label_undeclared),
    ("label value non-integral", "spinal", _label_fraction),
    ("label value negative", "spinal", _label_negative),
    ("label value NaN", "spinal", _label_nan),
    ("intensity NaN", "spinal", _intensity(np.nan)),
    ("intensity Inf", "phantom", _intensity(np.inf)),
    ("image 2D", "spinal", _image_2d),
    ("image 4D", "spinal", _image_4d),
    ("image RGB", "spinal", _image_rgb),
    ("spacing 0", "spinal", _spacing_header(0.0)),
    ("spacing negative", "spinal", _spacing_header(-1.0)),
    ("spacing NaN", "spinal", _spacing_header(float("nan"))),
    ("spacing over 100 mm", "spinal", _spacing_huge),
]


def _param(case_id: str, base: str, mutate) -> pytest.ParameterSet:
    marks = [pytest.mark.realdata] if base == "spinal" else []
    return pytest.param(base, mutate, id=f"{case_id} [{base}]".replace(" ", "-"), marks=marks)


@pytest.mark.parametrize("base, mutate", [_param(*c) for c in PLAN_CASES])
def test_plan_refuses_bad_dataset(base, mutate, tmp_path, capfd, phantom_raw):
    root = _spinal(tmp_path) if base == "spinal" else _phantom(tmp_path, phantom_raw)
    expected = mutate(root)
    before = _listing(root)
    work = tmp_path / "work"
    code, _, err = _run(capfd, "plan", root, "--workdir", work, "--workers", "1")
    line = _error_line(code, err)
    assert expected in line
    assert not (work / "plans.json").exists()
    assert not (work / "preprocessed").exists()
    assert _listing(root) == before


# --------------------------------------------------------------- accepted inputs (warnings, not errors)


def _plan_ok(capfd, root: Path, work: Path) -> str:
    before = _listing(root)
    code, out, err = _run(capfd, "plan", root, "--workdir", work, "--workers", "1")
    assert code == 0, err
    assert "Traceback" not in err
    assert (work / "plans.json").is_file()
    assert _listing(root) == before
    return err


@pytest.mark.realdata
def test_float_labels_with_whole_values_are_accepted(tmp_path, capfd):
    root = _spinal(tmp_path)
    assert _array(_label(root)).dtype == np.float32  # the real file, as distributed
    _plan_ok(capfd, root, tmp_path / "work")
    seg = np.load(next((tmp_path / "work" / "preprocessed").rglob(f"{SPINAL_CASES[0]}_seg.npy")))
    assert set(np.unique(seg).tolist()) <= {0, 1}


@pytest.mark.realdata
def test_empty_label_map_is_counted_and_reported(tmp_path, capfd):
    root = _spinal(tmp_path)
    _rewrite(_label(root), np.zeros_like(_array(_label(root))))
    err = _plan_ok(capfd, root, tmp_path / "work")
    assert f"1 case(s) have no foreground label: {SPINAL_CASES[0]}" in err
    fp = json.loads((tmp_path / "work" / "fingerprint.json").read_text())
    voxels = {c["case_id"]: c["label_voxels"]["spinal_cord"] for c in fp["cases"]}
    assert voxels[SPINAL_CASES[0]] == 0 and voxels[SPINAL_CASES[1]] > 0


@pytest.mark.realdata
@pytest.mark.parametrize("value", [0.0, 7.0], ids=["all-zero", "constant-7"])
def test_constant_image_plans_without_nan(value, tmp_path, capfd):
    """A constant image (e.g. a blank series) plans; its z-score is 0 everywhere, never NaN."""
    root = _spinal(tmp_path)
    _rewrite(_image(root), np.full_like(_array(_image(root)), value, dtype=np.float32))
    _plan_ok(capfd, root, tmp_path / "work")
    for npy in (tmp_path / "work" / "preprocessed").rglob(f"{SPINAL_CASES[0]}.npy"):
        image = np.load(npy)
        assert np.isfinite(image).all() and np.all(image == 0)


@pytest.mark.realdata
def test_origin_within_tolerance_is_accepted(tmp_path, capfd):
    root = _spinal(tmp_path)
    origin = sitk.ReadImage(str(_label(root))).GetOrigin()
    _rewrite(_label(root), origin=tuple(o + 0.005 for o in origin))  # below the 0.01 mm tolerance
    _plan_ok(capfd, root, tmp_path / "work")


def test_fix_nonfinite_replaces_nan_and_inf(tmp_path):
    """``read_channels(..., fix_nonfinite=True)``: NaN and -Inf become the finite minimum, +Inf the maximum."""
    from autoseg.io.volume import Geometry, read_channels, write_volume

    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 10
    arr.flat[[0, 1, 2]] = [np.nan, np.inf, -np.inf]
    path = tmp_path / f"case_0000{ENDING}"
    write_volume(
        arr, Geometry((2, 3, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), path
    )
    image, _, _ = read_channels([path], None, fix_nonfinite=True)
    assert image.flat[0] == 13 and image.flat[1] == 33 and image.flat[2] == 13
    assert np.isfinite(image).all()


# ------------------------------------------------------------------------ a WORK folder in a bad state


@pytest.fixture
def work_copy(planned_phantom, tmp_path) -> WorkDir:
    """plans.json and dataset.json of the planned phantom in a fresh WORK (no preprocessed data)."""
    work = WorkDir(tmp_path / "work")
    work.root.mkdir()
    for f in (planned_phantom.plans, planned_phantom.dataset_json):
        shutil.copyfile(f, work.root / f.name)
    return work


def _edit_plans(work: WorkDir, edit: Callable[[dict], None]) -> None:
    plans = json.loads(work.plans.read_text())
    edit(plans)
    work.plans.write_text(json.dumps(plans))


def _config(name: str, key: str, value) -> Callable[[dict], None]:
    return lambda p: p["configurations"][name].update({key: value})


PLANS_CASES = [
    ("bad JSON", lambda w: w.plans.write_text("{not json"), "invalid plans (JSONDecodeError: "),
    ("schema_version 99", lambda w: _edit_plans(w, lambda p: p.update(schema_version=99)), "plans schema_version 99 is not supported (expected one of 1, 2, 3)"),
    ("no schema_version", lambda w: _edit_plans(w, lambda p: p.pop("schema_version")), "plans schema_version None is not supported"),
    ("negative patch size", lambda w: _edit_plans(w, _config("3d_fullres", "patch_size", [-8, 32, 32])), "configuration '3d_fullres': patch_size [-8, 32, 32] must be"),
    ("patch size of wrong length", lambda w: _edit_plans(w, _config("3d_fullres", "patch_size", [32, 32])), "configuration '3d_fullres': patch_size [32, 32] must be"),
    ("batch size 0", lambda w: _edit_plans(w, _config("3d_fullres", "batch_size", 0)), "configuration '3d_fullres': batch_size 0 must be"),
    ("spacing negative", lambda w: _edit_plans(w, _config("3d_fullres", "spacing", [-1.0, 1.0, 1.0])), "configuration '3d_fullres': spacing [-1.0, 1.0, 1.0] must be"),
    ("missing configuration", lambda w: _edit_plans(w, lambda p: p["configurations"].pop("3d_fullres")), "configuration '3d_fullres' is not in the plans (available: 2d)"),
    ("no configurations key", lambda w: _edit_plans(w, lambda p: p.pop("configurations")), "required key 'configurations' is missing"),
    ("configurations not an object", lambda w: _edit_plans(w, lambda p: p.update(configurations=[1])), "'configurations' must be an object mapping names to configurations"),
]  # fmt: skip


@pytest.mark.parametrize(
    "mutate, expected", [pytest.param(m, e, id=i.replace(" ", "-")) for i, m, e in PLANS_CASES]
)
def test_train_refuses_invalid_plans(mutate, expected, work_copy, tmp_path, capfd):
    mutate(work_copy)
    before = _listing(work_copy.root)
    code, _, err = _run(capfd, "train", work_copy.root, "3d_fullres", "0", "--epochs", "1", "--device", "cpu")
    line = _error_line(code, err)
    assert f"{work_copy.plans}: {expected}" in line
    assert _listing(work_copy.root) == before


def test_plan_refuses_work_of_another_dataset(work_copy, tmp_path, capfd, phantom_raw):
    """WORK planned for the phantom, then ``plan DATASET_B --workdir WORK_of_A``."""
    other = _phantom(tmp_path, phantom_raw)
    _edit_json(other, lambda d: d.update(labels={"background": 0, "liver": 1, "tumour": 2}))
    before_work, before_data = _listing(work_copy.root), _listing(other)
    code, _, err = _run(capfd, "plan", other, "--workdir", work_copy.root, "--workers", "1")
    line = _error_line(code, err)
    assert f"{work_copy.root}: this WORK folder holds another dataset" in line
    assert _listing(work_copy.root) == before_work and _listing(other) == before_data


# ---------------------------------------------------------------------------------- predict's inputs


def _one_case_inputs(phantom_dataset: Path, folder: Path, channels=(0, 1)) -> Path:
    folder.mkdir()
    for c in channels:
        src = phantom_dataset / "imagesTr" / f"phantom_000_{c:04d}{ENDING}"
        shutil.copyfile(src, folder / src.name)
    return folder


def _predict_fails(capfd, work: Path, inputs: list[Path], out: Path, *extra) -> str:
    before = {p: _listing(p if p.is_dir() else p.parent) for p in inputs}
    code, _, err = _run(capfd, "predict", work, *inputs, out, "--device", "cpu", "--no-mirroring", *extra)
    line = _error_line(code, err)
    assert not out.exists()
    assert {p: _listing(p if p.is_dir() else p.parent) for p in inputs} == before
    return line


def test_predict_refuses_wrong_channel_count(planned_phantom, phantom_dataset, tmp_path, capfd):
    """The phantom model has two channels; inputs are checked before any model is loaded."""
    one = _one_case_inputs(phantom_dataset, tmp_path / "one", channels=(0,))
    line = _predict_fails(capfd, planned_phantom.root, [one], tmp_path / "out")
    assert f"{one}: case 'phantom_000' lacks channel(s) [1]; the model needs 2" in line

    three = _one_case_inputs(phantom_dataset, tmp_path / "three")
    shutil.copyfile(three / f"phantom_000_0000{ENDING}", three / f"phantom_000_0002{ENDING}")
    line = _predict_fails(capfd, planned_phantom.root, [three], tmp_path / "out")
    assert (
        f"{three / f'phantom_000_0002{ENDING}'}: channel 2, but the model was trained with 2 channel(s)"
        in line
    )

    single = tmp_path / "single"
    single.mkdir()
    shutil.copyfile(phantom_dataset / "imagesTr" / f"phantom_000_0000{ENDING}", single / f"scan{ENDING}")
    line = _predict_fails(capfd, planned_phantom.root, [single / f"scan{ENDING}"], tmp_path / "out")
    assert f"{single / f'scan{ENDING}'}: holds one channel, but the model needs 2" in line

    arr = _array(phantom_dataset / "imagesTr" / f"phantom_000_0000{ENDING}")
    four_d = single / f"scan4d{ENDING}"
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([arr] * 3), isVector=False), str(four_d))
    line = _predict_fails(capfd, planned_phantom.root, [four_d], tmp_path / "out")
    assert f"{four_d}: holds 3 channels in its 4th dimension, but the model needs 2" in line


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def trained_2d(planned_phantom, tmp_path_factory) -> WorkDir:
    """A copy of the planned phantom with a 2d checkpoint from one training iteration on every case (fold
    'all': no validation afterwards, which would take most of this file's time budget)."""
    import torch

    from autoseg.settings import TrainSettings
    from autoseg.training.loop import train_fold

    work = WorkDir(tmp_path_factory.mktemp("trained") / "work")
    shutil.copytree(planned_phantom.root, work.root)
    settings = TrainSettings(epochs=1, iters_per_epoch=1, val_iters=1, loader_workers=0)
    train_fold(work, "2d", "all", settings, torch.device("cpu"))
    return work


def _swap_in(work: WorkDir, tmp_path: Path, config: str, write: Callable[[Path], None]) -> WorkDir:
    """A WORK sharing ``work``'s plans and preprocessed data, with ``write`` making ``config``'s fold 'all'."""
    new = WorkDir(tmp_path / "work")
    new.root.mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(work.root / name, new.root / name)
    (new.root / "preprocessed").symlink_to(work.root / "preprocessed")
    fold = new.fold_dir(config, "all")
    fold.mkdir(parents=True)
    write(fold / "checkpoint_final.pt")
    return new


class _Exploit:
    """Unpickling this would create a marker file: weights_only loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _torch_save(obj) -> Callable[[Path], None]:
    import torch

    return lambda path: torch.save(obj, path)


def _other_architecture(trained: WorkDir) -> Callable[[Path], None]:
    import torch

    def write(path: Path) -> None:
        ckpt = torch.load(trained.fold_dir("2d", "all") / "checkpoint_final.pt", weights_only=True)
        topology = json.loads(ckpt["topology"])
        topology["architecture"] = "resenc"
        ckpt["topology"] = json.dumps(topology, sort_keys=True)
        torch.save(ckpt, path)

    return write


def test_predict_refuses_foreign_checkpoints(trained_2d, phantom_dataset, tmp_path, capfd):
    import torch

    inputs = _one_case_inputs(phantom_dataset, tmp_path / "inputs")
    final = trained_2d.fold_dir("2d", "all") / "checkpoint_final.pt"
    marker = tmp_path / "pwned"
    cases = [
        ("3d_fullres", lambda p: shutil.copyfile(final, p), "checkpoint is for configuration '2d', not '3d_fullres'"),
        ("2d", _other_architecture(trained_2d), "checkpoint network does not match the plans (architecture or topology changed)"),
        ("2d", lambda p: p.write_bytes(pickle.dumps({"network": _Exploit(marker)})), "refused to load: it holds Python objects other than tensors and plain data (loaded with weights_only=True, so none of its code ran)"),
        ("2d", lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"), "not a readable autoseg checkpoint (truncated or not a torch file"),
        ("2d", _torch_save(torch.zeros(3)), "not an autoseg checkpoint (a Tensor, not a dict with 'network', 'config' and 'topology')"),
        ("2d", _torch_save({"config": "2d"}), "not an autoseg checkpoint (missing 'network', 'topology')"),
    ]  # fmt: skip
    for i, (config, write, expected) in enumerate(cases):
        work = _swap_in(trained_2d, tmp_path / f"case{i}", config, write)
        before = _listing(work.root)
        out = tmp_path / f"out{i}"
        line = _predict_fails(capfd, work.root, [inputs], out, "--config", config, "--folds", "all")
        assert f"{work.fold_dir(config, 'all') / 'checkpoint_final.pt'}: {expected}" in line, line
        assert _listing(work.root) == before
    assert not marker.exists()


def test_predict_reports_nonfinite_input(trained_2d, phantom_dataset, tmp_path, capfd):
    inputs = _one_case_inputs(phantom_dataset, tmp_path / "inputs")
    arr = _array(inputs / f"phantom_000_0001{ENDING}")
    arr.flat[0] = np.nan
    _rewrite(inputs / f"phantom_000_0001{ENDING}", arr)
    line = _predict_fails(
        capfd, trained_2d.root, [inputs], tmp_path / "out", "--config", "2d", "--folds", "all"
    )
    assert (
        f"{inputs / f'phantom_000_0001{ENDING}'}: contains 1 NaN/Inf intensity value(s) (use --fix-nonfinite"
        in line
    )


def test_predict_fix_nonfinite_and_spacing_warning(trained_2d, phantom_dataset, tmp_path, capfd):
    """With --fix-nonfinite the NaN case predicts (with a warning naming the file); a case resampled to 5x
    the training spacing in-plane predicts with a warning that says so."""
    inputs = _one_case_inputs(phantom_dataset, tmp_path / "inputs")
    for c in (0, 1):
        path = inputs / f"phantom_000_{c:04d}{ENDING}"
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        if c == 1:
            arr.flat[0] = np.nan
        out_img = sitk.GetImageFromArray(arr)
        out_img.CopyInformation(img)
        sx, sy, sz = img.GetSpacing()
        out_img.SetSpacing((sx * 5, sy * 5, sz))
        sitk.WriteImage(out_img, str(path))
    code, _, err = _run(
        capfd, "predict", trained_2d.root, inputs, tmp_path / "out", "--device", "cpu", "--no-mirroring",
        "-c", "2d", "--folds", "all", "--fix-nonfinite",
    )  # fmt: skip
    assert code == 0, err
    assert f"{inputs / f'phantom_000_0001{ENDING}'}: replaced 1 NaN/Inf" in err
    assert "spacing far outside the training range (more than 2x;" in err
    assert (tmp_path / "out" / f"phantom_000{ENDING}").is_file()


def test_spacing_outside_training_range_is_described():
    """The helper behind the prediction-time warning."""
    from autoseg.preprocessing.pipeline import spacing_outside_training

    train = [[3.0, 1.0, 1.0], [2.5, 0.8, 0.8]]
    assert spacing_outside_training((3.0, 0.9, 0.9), train) is None
    assert spacing_outside_training((4.0, 1.5, 1.5), train) is None  # within 2x
    assert spacing_outside_training((10.0, 0.9, 0.9), train) == (
        "spacing far outside the training range (more than 2x; axis 0: 10 mm vs 2.5-3 mm)"
    )
