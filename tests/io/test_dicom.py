"""DICOM in and out (issue 19): series read by position with rescale applied, refused when irregular, matched
to channels; DICOM-SEG and RT-STRUCT written in the right physical place, checked by reading them back
independently of autoseg's writers (highdicom, pydicom + skimage.draw) against NIfTI on the same grid."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from autoseg.errors import AutosegError, DatasetError  # noqa: E402
from autoseg.io import dicom  # noqa: E402
from autoseg.io.dicom_seg import read_dicom_seg, write_dicom_seg, write_rtstruct  # noqa: E402
from autoseg.layout import WorkDir  # noqa: E402
from autoseg.settings import TrainSettings  # noqa: E402
from autoseg.training.loop import train_fold  # noqa: E402
from tests.conftest import real_dataset  # noqa: E402
from tests.io.dicom_helpers import (  # noqa: E402
    compare_in_space,
    quantize,
    rasterise_rtstruct,
    rotation,
    seg_volume_highdicom,
    series_image,
    sorted_by_position,
    write_series,
)
from tests.test_bad_input import _error_line, _listing, _run  # noqa: E402

TINY = TrainSettings(epochs=2, iters_per_epoch=3, val_iters=1, seed=5, loader_workers=0)

# (dataset folder, image, label): CT with 5 mm slices, an MR case stored PSR, a very anisotropic oblique MR
REAL = {
    "spleen_ct": ("fixtures/msd_spleen2_crop", "image_ct.nii.gz", "label_spleen.nii.gz"),
    "cord_mr_psr": (
        "Dataset003_SpinalCordTiny",
        "imagesTr/sct_errsm30_t2w_0000.nii.gz",
        "labelsTr/sct_errsm30_t2w.nii.gz",
    ),
    "cord_t2star_aniso": (
        "fixtures/sct_t2star_anisotropic",
        "image_t2star.nii.gz",
        "label_spinalcord.nii.gz",
    ),
}
# acquisitions: slices stacked along S (axial), along R (sagittal), or an oblique stack (rotated grid)
ACQUISITIONS = {"axial": "LPS", "sagittal": "PIR", "oblique": None}


def _real(name: str) -> tuple[sitk.Image, sitk.Image]:
    folder, image, label = REAL[name]
    root = real_dataset(folder)
    img = sitk.Cast(sitk.ReadImage(str(root / image)), sitk.sitkFloat32)
    lab = sitk.Cast(sitk.ReadImage(str(root / label)) > 0, sitk.sitkUInt8)
    return img, lab


def _oblique(img: sitk.Image) -> sitk.Image:
    """The same voxels on a grid tilted 20° about x and 10° about z (a real oblique stack)."""
    out = sitk.Image(img)
    d = np.array(img.GetDirection()).reshape(3, 3)
    out.SetDirection(tuple((rotation("z", 10) @ rotation("x", 20) @ d).reshape(-1)))
    return out


def _acquire(img: sitk.Image, acquisition: str) -> tuple[sitk.Image, str | None]:
    code = ACQUISITIONS[acquisition]
    return (_oblique(img), None) if code is None else (img, code)


# --- reading -------------------------------------------------------------------------------------------------


@pytest.mark.realdata
@pytest.mark.parametrize("name", list(REAL))
@pytest.mark.parametrize("acquisition", list(ACQUISITIONS))
def test_series_reads_like_the_nifti(name, acquisition, tmp_path):
    """Shuffled file names, slope/intercept, any stacking direction: the same voxels in the same place."""
    img, _ = _real(name)
    img, code = _acquire(img, acquisition)
    slope, intercept = (0.5, -1024.0) if name == "spleen_ct" else (0.25, -10.0)
    img = quantize(img, slope, intercept)
    files = write_series(img, tmp_path / "s", orientation=code, slope=slope, intercept=intercept)
    assert sorted(f.name for f in files) != [f.name for f in files] or len(files) < 3  # names say nothing
    (series,) = dicom.scan_series(tmp_path / "s")
    assert [f.name for f in series.files] == [f.name for f in sorted_by_position(files)]
    case = dicom.DicomCase("c", (series.files[0],), None, series=(series,))
    raw, geom, source = dicom.read_dicom_channels(case, "LPS")
    ref = sitk.DICOMOrient(img, "LPS")
    np.testing.assert_allclose(raw[0], sitk.GetArrayFromImage(ref), atol=1e-3 * slope)
    assert np.allclose(geom.origin_mm, ref.GetOrigin(), atol=1e-3)
    assert np.allclose(geom.direction, ref.GetDirection(), atol=1e-5)
    assert np.allclose(geom.spacing_mm, ref.GetSpacing()[::-1], rtol=1e-5)
    # the stored values really are rescaled: raw pixel data differ from the intensities
    import pydicom

    stored = pydicom.dcmread(series.files[0]).pixel_array
    assert not np.allclose(stored, raw[0, 0] if code == "LPS" else stored * slope + intercept + 1)


# --- writing: geometry of DICOM-SEG and RT-STRUCT -----------------------------------------------------------


def _check_outputs(seg_path, rt_path, series_files, reference: sitk.Image, label_name: str) -> dict:
    """DICOM-SEG (highdicom) and RT-STRUCT (rasterised with skimage.draw) read back onto the series grid and
    compared in patient space with ``reference`` (a NIfTI mask): Dice and centroid distance."""
    files = sorted_by_position(series_files)
    seg, names = seg_volume_highdicom(seg_path, files)
    assert names == [label_name]
    rt = rasterise_rtstruct(rt_path, files)
    out = {}
    for what, mask in (("seg", seg == 1), ("rtstruct", rt[label_name])):
        d, dist, half = compare_in_space(series_image(mask.astype(np.uint8), files), reference)
        assert d >= 0.99, (what, d)
        assert dist <= half, (what, dist, half)
        out[what] = (d, dist)
    return out


@pytest.mark.realdata
@pytest.mark.parametrize("name", list(REAL))
@pytest.mark.parametrize("acquisition", list(ACQUISITIONS))
def test_seg_and_rtstruct_land_where_the_nifti_label_is(name, acquisition, tmp_path):
    """A real label map through autoseg's DICOM export path: same voxels, same physical place."""
    img, lab = _real(name)
    img, code = _acquire(img, acquisition)
    lab, _ = _acquire(lab, acquisition)
    write_series(quantize(img, 1.0, 0.0), tmp_path / "s", orientation=code)
    (series,) = dicom.scan_series(tmp_path / "s")
    case = dicom.DicomCase("c", (series.files[0],), None, series=(series,))
    _, _, source = dicom.read_dicom_channels(case, None)
    # the label in the series' own order, as predict hands it to the writers
    in_series_order = sitk.DICOMOrient(lab, dicom.orientation_code(source))
    seg = sitk.GetArrayFromImage(in_series_order)
    assert seg.shape == source.shape
    labels = {"background": 0, "structure": 1}
    write_dicom_seg(seg, series.files, labels, tmp_path / "c.seg.dcm")
    write_rtstruct(seg, series.files, labels, tmp_path / "c.rtstruct.dcm")
    _check_outputs(tmp_path / "c.seg.dcm", tmp_path / "c.rtstruct.dcm", list(series.files), lab, "structure")
    back, g = read_dicom_seg(tmp_path / "c.seg.dcm", labels)  # autoseg's own reader (for evaluate)
    assert g.matches(source)
    np.testing.assert_array_equal(back, seg)


def test_rtstruct_contours_keep_holes_and_single_pixels(tmp_path):
    """A ring (with its hole) and an isolated pixel survive contouring and even-odd rasterisation exactly."""
    img = sitk.GetImageFromArray(np.zeros((3, 20, 20), dtype=np.float32))
    img.SetSpacing((0.7, 0.9, 2.0))
    write_series(img, tmp_path / "s", orientation="LPS")
    (series,) = dicom.scan_series(tmp_path / "s")
    seg = np.zeros((3, 20, 20), np.uint8)
    seg[1, 4:15, 4:15] = 1
    seg[1, 7:12, 7:12] = 0
    seg[1, 9, 9] = 1  # a pixel inside the hole
    seg[2, 0, 0] = 1  # at the border
    write_rtstruct(seg, series.files, {"ring": 1}, tmp_path / "r.dcm")
    mask = rasterise_rtstruct(tmp_path / "r.dcm", list(series.files))["ring"]
    np.testing.assert_array_equal(mask, seg == 1)


# --- refused and tolerated series ---------------------------------------------------------------------------


def _small(shape=(6, 12, 10), spacing=(0.8, 0.8, 3.0), seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    img = sitk.GetImageFromArray(rng.integers(0, 200, size=shape).astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin((10.0, -20.0, 5.0))
    return img


def test_missing_slice_is_refused_naming_series_and_gap(tmp_path):
    files = write_series(_small(), tmp_path / "s", description="AX T2", series_number=7, shuffle=False)
    files[3].unlink()
    with pytest.raises(DatasetError) as exc:
        dicom.scan_series(tmp_path / "s")
    msg = str(exc.value)
    assert "AX T2" in msg and "#7" in msg and "gap of 6 mm" in msg and "missing slice" in msg, msg


@pytest.mark.parametrize("shift,message", [(1.5, "shifted 7.5 mm"), (0.05, "shifted 0.25 mm")])
def test_gantry_tilt_is_refused(shift, message, tmp_path):
    """Slices shifted in-plane in proportion to their position (a tilted stack), even by 1 degree."""
    import pydicom

    files = write_series(_small(), tmp_path / "s", shuffle=False)
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + shift * k, z]
        ds.save_as(f)
    with pytest.raises(DatasetError, match=message + r" in-plane .*gantry tilt of about"):
        dicom.scan_series(tmp_path / "s")


def test_duplicate_positions_are_refused(tmp_path):
    files = write_series(_small(), tmp_path / "s", shuffle=False)
    shutil.copy(files[2], tmp_path / "s" / "copy")
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(tmp_path / "s" / "copy")
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "s" / "copy")
    with pytest.raises(DatasetError, match="same position"):
        dicom.scan_series(tmp_path / "s")


def test_non_dicom_files_and_other_objects_are_ignored(tmp_path, caplog):
    img = _small()
    write_series(img, tmp_path / "s" / "sub")
    (tmp_path / "s" / "README.txt").write_text("not an image")
    (tmp_path / "s" / "notes.json").write_text("{}")
    (tmp_path / "s" / "sub" / "garbage.bin").write_bytes(bytes(range(256)) * 3)
    (tmp_path / "s" / "DICOMDIR-like").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")  # marker, then junk
    assert dicom.is_dicom_input([tmp_path / "s"])
    with caplog.at_level("INFO", logger="autoseg"):
        (series,) = dicom.scan_series(tmp_path / "s")
    assert len(series.files) == 6
    assert any("ignored 3 non-DICOM file(s)" in r.getMessage() for r in caplog.records)


def test_multi_series_folder_split_by_uid_and_matched_to_channels(tmp_path):
    img = _small()
    study = "1.2.3.4"
    write_series(img, tmp_path / "f", description="T1", series_number=3, study_uid=study, seed=1)
    write_series(
        _small(seed=1), tmp_path / "f", description="T2 axial", series_number=4, study_uid=study, seed=2
    )
    write_series(
        _small(seed=2), tmp_path / "f", description="T1 post", series_number=5, study_uid=study, seed=3
    )
    series = dicom.scan_series(tmp_path / "f")
    assert [s.description for s in series] == ["T1", "T2 axial", "T1 post"]
    assert all(len(s.files) == 6 for s in series)
    # one-channel model: every series is a case
    one = dicom.discover_dicom_cases([tmp_path / "f"], 1)
    assert [c.case_id for c in one] == ["f_3", "f_4", "f_5"]
    # two channels from dataset.json's channel names: 'T1' exact beats substring 'T1 post'; 'T2' unique substring
    (case,) = dicom.discover_dicom_cases([tmp_path / "f"], 2, ["T1", "T2"])
    assert [s.description for s in case.series] == ["T1", "T2 axial"]
    (case,) = dicom.discover_dicom_cases([tmp_path / "f"], 2, ["T1", "T2"], {0: "post"})
    assert [s.description for s in case.series] == ["T1 post", "T2 axial"]
    with pytest.raises(
        DatasetError, match=r"no series matches channel 1 \('FLAIR'.*'T1', 'T2 axial', 'T1 post'"
    ):
        dicom.discover_dicom_cases([tmp_path / "f"], 2, ["T1", "FLAIR"])
    with pytest.raises(DatasetError, match="matches 2 series"):
        dicom.discover_dicom_cases([tmp_path / "f"], 2, ["T1", "T2"], {0: "1"})
    with pytest.raises(AutosegError, match="--channel 1=DESCRIPTION"):
        dicom.discover_dicom_cases([tmp_path / "f"], 2, ["T1"])


def test_channel_rules_parse():
    assert dicom.parse_channel_rules(["0=T1", "1 = FLAIR"]) == {0: "T1", 1: "FLAIR"}
    for bad in (["T1"], ["x=T1"], ["0="], ["0=a", "0=b"]):
        with pytest.raises(AutosegError, match="--channel"):
            dicom.parse_channel_rules(bad)


# --- predict end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(planned_phantom, tmp_path_factory) -> WorkDir:
    """3d_fullres fold 0 of the phantom (channels T1, T2), trained for a few iterations."""
    root = tmp_path_factory.mktemp("trained_dicom") / "work"
    shutil.copytree(planned_phantom.root, root, ignore=shutil.ignore_patterns("results"))
    work = WorkDir(root)
    train_fold(work, "3d_fullres", 0, TINY, torch.device("cpu"))
    return work


FAST = ["-c", "3d_fullres", "-f", "0", "--device", "cpu", "--no-mirroring", "--compile", "off", "--step", "1"]


def _phantom_case(phantom_dataset: Path, acquisition: str, tmp_path: Path):
    """A phantom case (quantised as the series store it), on an oblique grid for 'oblique', as NIfTI inputs,
    and the same volumes as two DICOM series (T1, T2) in one folder, stacked per ``acquisition``."""
    case = sorted(
        p.name[: -len("_0000.nii.gz")] for p in (phantom_dataset / "imagesTr").glob("*_0000.nii.gz")
    )[0]
    nifti_in, dicom_in = tmp_path / "nifti_in", tmp_path / "dicom_in" / case
    nifti_in.mkdir()
    study, frame = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    for ch, desc in enumerate(("T1", "T2")):
        img = sitk.Cast(
            sitk.ReadImage(str(phantom_dataset / "imagesTr" / f"{case}_{ch:04d}.nii.gz")), sitk.sitkFloat32
        )
        img, code = _acquire(img, acquisition)
        img = quantize(img, 0.001, -5.0)
        sitk.WriteImage(img, str(nifti_in / f"{case}_{ch:04d}.nii.gz"))
        write_series(
            img, dicom_in, orientation=code, slope=0.001, intercept=-5.0, modality="MR", description=desc,
            series_number=ch + 1, study_uid=study, frame_uid=frame, seed=ch,
        )  # fmt: skip
    return case, nifti_in, dicom_in


@pytest.mark.parametrize(
    "acquisition",
    [
        "axial",
        pytest.param("sagittal", marks=pytest.mark.slow),
        pytest.param("oblique", marks=pytest.mark.slow),
    ],
)
def test_predict_from_dicom_matches_nifti_prediction(trained, phantom_dataset, acquisition, tmp_path, capfd):
    case, nifti_in, dicom_in = _phantom_case(phantom_dataset, acquisition, tmp_path)
    code, _, err = _run(capfd, "predict", *FAST, trained.root, nifti_in, tmp_path / "from_nifti")
    assert code == 0, err
    code, _, err = _run(
        capfd, "predict", *FAST, "--output-format", "nifti", "--output-format", "dicom-seg",
        "--output-format", "rtstruct", trained.root, dicom_in, tmp_path / "from_dicom",
    )  # fmt: skip
    assert code == 0, err
    out = tmp_path / "from_dicom"
    assert sorted(p.name for p in out.iterdir()) == [
        f"{case}.nii.gz",
        f"{case}.rtstruct.dcm",
        f"{case}.seg.dcm",
    ]
    reference = sitk.ReadImage(str(tmp_path / "from_nifti" / f"{case}.nii.gz"))
    ref_arr = sitk.GetArrayFromImage(reference)
    labels = {"background": 0, **{n: v for n, v in _labels(trained).items() if v}}
    for name, value in labels.items():
        if value == 0 or not (ref_arr == value).any():
            continue
        ref_mask = sitk.Cast(reference == value, sitk.sitkUInt8)
        series_files = _series_files(dicom_in, "T1")
        seg, names = seg_volume_highdicom(out / f"{case}.seg.dcm", series_files)
        number = names.index(name) + 1
        rt = rasterise_rtstruct(out / f"{case}.rtstruct.dcm", series_files)
        nii = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        for what, img in (
            ("seg", series_image((seg == number).astype(np.uint8), series_files)),
            ("rtstruct", series_image(rt[name].astype(np.uint8), series_files)),
            ("nifti", sitk.Cast(nii == value, sitk.sitkUInt8)),
        ):
            d, dist, half = compare_in_space(img, ref_mask)
            assert d >= 0.99 and dist <= half, (acquisition, name, what, d, dist, half)
    assert (ref_arr > 0).any(), "the tiny model predicted nothing: the comparison would be empty"
    # evaluate takes the DICOM-SEG as a prediction against the NIfTI prediction as reference
    only_seg = tmp_path / "only_seg"
    only_seg.mkdir()
    shutil.copy(out / f"{case}.seg.dcm", only_seg)
    code, _, err = _run(
        capfd, "evaluate", tmp_path / "from_nifti", only_seg, "--dataset-json", trained.dataset_json
    )
    assert code == 0, err
    import json

    summary = json.loads((only_seg / "summary.json").read_text())
    dices = [r["dice"] for r in summary["per_case"] if r["dice"] is not None]
    assert dices and min(dices) >= 0.99, summary["per_case"]


def _labels(work: WorkDir) -> dict[str, int]:
    from autoseg.io.dataset import load_dataset_json

    return load_dataset_json(work.dataset_json).labels


def _series_files(folder: Path, description: str) -> list[Path]:
    (s,) = [s for s in dicom.scan_series(folder) if s.description == description]
    return sorted_by_position(list(s.files))


# each real volume in one acquisition in the quick suite; the full grid of volumes × acquisitions with -m slow
REAL_PREDICT = [
    pytest.param(name, acq, marks=[] if (name, acq) in QUICK else [pytest.mark.slow])
    for name in REAL
    for acq in ACQUISITIONS
    for QUICK in [{("spleen_ct", "sagittal"), ("cord_mr_psr", "axial"), ("cord_t2star_aniso", "oblique")}]
]
# a crop through the spleen: seconds, not minutes
CROPS = {"spleen_ct": (slice(40, 104), slice(40, 104), slice(6, 18))}


@pytest.mark.realdata
@pytest.mark.parametrize("name,acquisition", REAL_PREDICT)
def test_predict_real_series_end_to_end(trained, name, acquisition, tmp_path, capfd):
    """A real volume (as both channels of the phantom model), written as a DICOM series (shuffled names,
    slope/intercept), predicted to DICOM-SEG, RT-STRUCT and NIfTI: read back independently, they agree with the
    NIfTI prediction of the same volume in voxels and in physical place."""
    img, _ = _real(name)
    if name in CROPS:
        img = img[CROPS[name]]
    img, code = _acquire(img, acquisition)
    slope, intercept = (0.5, -1024.0) if name == "spleen_ct" else (0.25, -10.0)
    img = quantize(img, slope, intercept)
    (tmp_path / "nii").mkdir()
    for ch in (0, 1):
        sitk.WriteImage(img, str(tmp_path / "nii" / f"vol_{ch:04d}.nii.gz"))
    write_series(
        img, tmp_path / "vol", orientation=code, slope=slope, intercept=intercept, description="scan"
    )
    code, _, err = _run(capfd, "predict", *FAST, trained.root, tmp_path / "nii", tmp_path / "a")
    assert code == 0, err
    code, _, err = _run(
        capfd, "predict", *FAST, "--channel", "0=scan", "--channel", "1=SCAN", "--output-format", "dicom-seg",
        "--output-format", "rtstruct", "--output-format", "nifti", trained.root, tmp_path / "vol", tmp_path / "b",
    )  # fmt: skip
    assert code == 0, err
    ref = sitk.ReadImage(str(tmp_path / "a" / "vol.nii.gz"))
    assert sitk.GetArrayFromImage(ref).any(), "the tiny model predicted nothing: nothing to compare"
    files = _series_files(tmp_path / "vol", "scan")
    seg, names = seg_volume_highdicom(tmp_path / "b" / "vol.seg.dcm", files)
    rt = rasterise_rtstruct(tmp_path / "b" / "vol.rtstruct.dcm", files)
    nii = sitk.ReadImage(str(tmp_path / "b" / "vol.nii.gz"))
    for number, label in enumerate(names, start=1):
        value = _labels(trained)[label]
        ref_mask = sitk.Cast(ref == value, sitk.sitkUInt8)
        outputs = {
            "seg": series_image((seg == number).astype(np.uint8), files),
            "rtstruct": series_image(rt[label].astype(np.uint8), files),
            "nifti": sitk.Cast(nii == value, sitk.sitkUInt8),
        }
        for what, mask in outputs.items():
            if not sitk.GetArrayFromImage(ref_mask).any():
                assert not sitk.GetArrayFromImage(mask).any(), (label, what)
                continue
            d, dist, half = compare_in_space(mask, ref_mask)
            assert d >= 0.99 and dist <= half, (name, acquisition, label, what, d, dist, half)


# --- user errors: one line, exit 2, nothing written ---------------------------------------------------------


def test_predict_dicom_user_errors(trained, tmp_path, capfd):
    write_series(_small(), tmp_path / "in" / "s1", description="T1", series_number=1)
    files = write_series(_small(), tmp_path / "gap", description="T1", series_number=2, shuffle=False)
    files[2].unlink()
    (tmp_path / "nii").mkdir()
    sitk.WriteImage(_small(), str(tmp_path / "nii" / "a_0000.nii.gz"))
    sitk.WriteImage(_small(), str(tmp_path / "nii" / "a_0001.nii.gz"))
    out = tmp_path / "out"
    cases = [
        (["--output-format", "png", tmp_path / "in" / "s1"], "--output-format: 'png' is not one of"),
        (["--output-format", "dicom-seg", tmp_path / "nii"], "needs DICOM series as input"),
        (["--channel", "0=T1", tmp_path / "nii"], "--channel: only for DICOM series inputs"),
        (["--channel", "T1", tmp_path / "in" / "s1"], "is not INDEX=DESCRIPTION"),
        ([tmp_path / "in" / "s1"], "no series matches channel 1 ('T2'"),
        (["--channel", "1=T1", tmp_path / "gap"], "irregular slice spacing"),
        ([files[0]], "give the folder of a DICOM series"),
    ]
    before = _listing(tmp_path)
    for args, expected in cases:
        code, _, err = _run(capfd, "predict", *FAST, trained.root, *args, out)
        line = _error_line(code, err)
        assert expected in line, (args, line)
    assert _listing(tmp_path) == before and not out.exists()


def test_refused_dicom_predict_deletes_nothing_in_output(trained, tmp_path, capfd):
    """Issue 13's rule holds for DICOM outputs too: every check comes first, and a refused run touches nothing
    in OUTPUT: not a user's hidden file named like an output's temporary, not an earlier output."""
    write_series(_small(), tmp_path / "in" / "s1", description="T1", series_number=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".s1.seg.dcm.my-notes.txt").write_text("mine")
    (out / "s1.seg.dcm").write_bytes(b"an earlier output")
    before = _listing(out)
    channels = ["--channel", "0=T1", "--channel", "1=T1", "--output-format", "dicom-seg"]
    for extra, expected in (([], "already exists"), (["--overwrite", "--folds", "7"], "--folds 7")):
        code, _, err = _run(
            capfd, "predict", *FAST, *channels, *extra, trained.root, tmp_path / "in" / "s1", out
        )
        assert expected in _error_line(code, err)
    assert _listing(out) == before


def test_missing_extra_is_one_error_line(trained, tmp_path, capfd, monkeypatch):
    write_series(_small(), tmp_path / "in", description="T1")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    code, _, err = _run(capfd, "predict", *FAST, trained.root, tmp_path / "in", tmp_path / "out")
    line = _error_line(code, err)
    assert "pip install 'autoseg[dicom]'" in line, line
    assert not (tmp_path / "out").exists()


def test_dicom_outputs_are_atomic(trained, phantom_dataset, tmp_path, capfd, monkeypatch):
    """A DICOM-SEG write that fails half-way leaves neither the file nor a temporary file; the rerun with
    --continue writes what is missing."""
    case, _, dicom_in = _phantom_case(phantom_dataset, "axial", tmp_path)
    import highdicom

    real_save = highdicom.seg.Segmentation.save_as

    def broken(self, path, *a, **k):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(highdicom.seg.Segmentation, "save_as", broken)
    args = [
        "--output-format",
        "rtstruct",
        "--output-format",
        "dicom-seg",
        trained.root,
        dicom_in,
        tmp_path / "o",
    ]
    with pytest.raises(OSError, match="disk full"):
        _run(capfd, "predict", *FAST, *args)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [f"{case}.rtstruct.dcm"]
    monkeypatch.setattr(highdicom.seg.Segmentation, "save_as", real_save)
    code, _, err = _run(capfd, "predict", *FAST, "--continue", *args)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [f"{case}.rtstruct.dcm", f"{case}.seg.dcm"]
    import pydicom

    assert pydicom.dcmread(tmp_path / "o" / f"{case}.seg.dcm").Modality == "SEG"


def test_region_segments_overlap_and_read_back_in_painting_order(tmp_path):
    """Region-based models: each region is a segment / ROI (they overlap); read back, regions are painted in
    regions_class_order, which gives the label map again."""
    from autoseg.io.dataset import parse_dataset_json
    from autoseg.io.dicom_seg import segment_values, segments_of

    spec = parse_dataset_json(
        {
            "channel_names": {"0": "MR"},
            "labels": {"background": 0, "whole": [1, 2], "core": [2]},
            "regions_class_order": [1, 2],
            "file_ending": ".nii.gz",
        }
    )
    assert segments_of(spec) == [("whole", (1, 2)), ("core", (2,))]
    write_series(_small(), tmp_path / "s", orientation="LPS")
    (series,) = dicom.scan_series(tmp_path / "s")
    seg = np.zeros((6, 12, 10), np.uint8)
    seg[1:5, 2:10, 2:8] = 1
    seg[2:4, 4:8, 3:6] = 2
    write_dicom_seg(seg, series.files, segments_of(spec), tmp_path / "r.seg.dcm")
    write_rtstruct(seg, series.files, segments_of(spec), tmp_path / "r.rt.dcm")
    files = list(series.files)
    import highdicom as hd
    import pydicom

    obj = hd.seg.segread(tmp_path / "r.seg.dcm")
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    for number, values in ((1, (1, 2)), (2, (2,))):
        got = obj.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[number])
        np.testing.assert_array_equal(np.asarray(got)[..., 0] > 0, np.isin(seg, values))
    rt = rasterise_rtstruct(tmp_path / "r.rt.dcm", files)
    np.testing.assert_array_equal(rt["whole"], seg > 0)
    np.testing.assert_array_equal(rt["core"], seg == 2)
    back, _ = read_dicom_seg(tmp_path / "r.seg.dcm", segment_values(spec))
    np.testing.assert_array_equal(back, seg)


@pytest.mark.parametrize(
    "tag,message", [("PixelSpacing", "PixelSpacing"), ("Rows", "incomplete image header")]
)
def test_incomplete_slice_header_is_one_error(tag, message, tmp_path):
    import pydicom

    files = write_series(_small(), tmp_path / "s", description="AX", shuffle=False)
    ds = pydicom.dcmread(files[0])
    delattr(ds, tag)
    ds.save_as(files[0])
    with pytest.raises(DatasetError, match=message):
        dicom.scan_series(tmp_path / "s")
