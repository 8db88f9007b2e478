"""Folder evaluation on tiny label maps written with SimpleITK, and on the real spinal-cord labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from autoseg.errors import AutosegError
from autoseg.evaluation.evaluate import CSV_COLUMNS, evaluate_case, evaluate_folders, structures, summarize
from autoseg.evaluation.metrics import binary_metrics
from autoseg.io.dataset import DatasetSpec, load_dataset_json
from autoseg.io.volume import read_volume, write_volume

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SPINAL_CORD = SHARED_DATA / "Dataset003_SpinalCordTiny"

SPACING_MM = (3.0, 1.0, 1.0)  # array order (z, y, x): thick slices
# Area-weighted NSD of a 5x5x5 cube against itself one 3 mm slice higher (tests/evaluation/test_nsd.py works
# it out): surfel areas in mm² are 1 (z-facing face), 3 (side faces), 3*sqrt(2)/2 (vertical edges),
# sqrt(10)/2 (horizontal edges), sqrt(19)/8 (vertices); each cube has 312.9 mm² of them.
_CUBE_AREA = 32 + 16 * 10**0.5 + 19**0.5 + 192 + 24 * 2**0.5
LIVER_NSD_0MM = (192 + 24 * 2**0.5 + 8 * 10**0.5 + 19**0.5 / 2) / _CUBE_AREA  # side walls and the near rim
LIVER_NSD_1MM = LIVER_NSD_0MM + 12 / _CUBE_AREA  # and 12 of the 16 near-face surfels (1 mm from a side wall)
SHAPE = (10, 12, 12)
SPEC = DatasetSpec(
    channel_names=("MRI",),
    labels={"background": 0, "liver": 1, "tumour": 2},
    file_ending=".nii.gz",
    regions={"liver_and_tumour": (1, 2)},
)


def write_labels(path: Path, array: np.ndarray, spacing_mm=SPACING_MM, dtype=np.uint8) -> Path:
    image = sitk.GetImageFromArray(array.astype(dtype))
    image.SetSpacing(tuple(reversed(spacing_mm)))  # SimpleITK wants (x, y, z)
    sitk.WriteImage(image, str(path))
    return path


def liver_cube(z0: int) -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[z0 : z0 + 5, 1:6, 1:6] = 1
    return labels


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Two cases worked out by hand (3x1x1 mm voxels, 3 mm³ each).

    case01: liver is a 5x5x5 cube, predicted one slice too high: Dice 100*2/250 = 0.8, HD95 one slice = 3 mm.
            tumour is a 2x2x2 block, predicted exactly: Dice 1. Region liver+tumour: overlap 100 + 8 of
            133 voxels on each side: Dice 108/133.
    case02: liver predicted exactly; no tumour in either map, so tumour metrics are not defined.
    case03: a reference without prediction, which is not evaluated.
    """
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    ref1, pred1 = liver_cube(1), liver_cube(2)
    ref1[7:9, 8:10, 8:10] = 2
    pred1[7:9, 8:10, 8:10] = 2
    write_labels(ref_dir / "case01.nii.gz", ref1)
    write_labels(pred_dir / "case01.nii.gz", pred1)
    # Float storage with whole-number values is common in real data.
    write_labels(ref_dir / "case02.nii.gz", liver_cube(1), dtype=np.float32)
    write_labels(pred_dir / "case02.nii.gz", liver_cube(1))
    write_labels(ref_dir / "case03.nii.gz", liver_cube(3))
    return ref_dir, pred_dir


def test_evaluate_case_scores_labels_then_regions_and_skips_background():
    reference, prediction = liver_cube(1), liver_cube(2)
    result = evaluate_case(reference, prediction, SPACING_MM, SPEC.labels, SPEC.regions)
    assert list(result) == ["liver", "tumour", "liver_and_tumour"]
    assert result["liver"]["dice"] == pytest.approx(0.8)
    assert result["liver"]["hd95"] == pytest.approx(3.0)
    assert result["tumour"]["dice"] is None
    assert result["liver_and_tumour"]["dice"] == pytest.approx(0.8)


def test_region_repeating_a_label_is_scored_once_and_a_clash_is_an_error(folders):
    # BraTS' dataset.json lists "enhancing_tumor": [4] both as a label and as a region.
    labels = {"background": 0, "edema": 2, "enhancing_tumor": 4}
    regions = {"whole_tumor": (2, 4), "enhancing_tumor": (4,)}
    assert structures(labels, regions) == {"edema": (2,), "enhancing_tumor": (4,), "whole_tumor": (2, 4)}
    with pytest.raises(ValueError, match="enhancing_tumor"):
        structures(labels, {"enhancing_tumor": (2, 4)})
    ref_dir, pred_dir = folders
    clashing = DatasetSpec(
        ("MRI",), {"background": 0, "liver": 1, "tumour": 2}, ".nii.gz", regions={"liver": (1, 2)}
    )
    with pytest.raises(AutosegError, match="dataset.json: region 'liver'"):
        evaluate_folders(ref_dir, pred_dir, clashing)


def test_summarize_averages_defined_values_and_counts_the_rest():
    per_case = {
        "a": {"x": {"dice": 0.5, "tp": 1, "fp": 1, "fn": 1}, "y": {"dice": None, "tp": 0, "fp": 0, "fn": 0}},
        "b": {"x": {"dice": 1.0, "tp": 1, "fp": 0, "fn": 0}, "y": {"dice": 0.0, "tp": 0, "fp": 0, "fn": 3}},
        "c": {"x": {"dice": 0.0, "tp": 0, "fp": 2, "fn": 2}, "y": {"dice": None, "tp": 0, "fp": 4, "fn": 0}},
    }
    for case in per_case.values():
        for metrics in case.values():
            undefined = ("iou", "precision", "recall", "voe", "rvd", "hd", "hd95", "assd", "nsd", "nsd_voxel")
            metrics.update(dict.fromkeys(undefined, None))
            metrics.update(reference_volume_ml=1.0, predicted_volume_ml=2.0, tn=5, specificity=0.5)
    # a reference that fills the image has no background: specificity is undefined, and says why
    per_case["c"]["x"].update(specificity=None, tn=0, fp=0)
    summary = summarize(per_case)
    x, y = summary["mean"]["x"], summary["mean"]["y"]
    assert x["n_cases"] == 3
    assert x["dice"] == {"mean": 0.5, "median": 0.5, "n_excluded": 0, "excluded_reason": None}
    assert y["dice"]["mean"] == 0.0 and y["dice"]["n_excluded"] == 2
    assert y["dice"]["excluded_reason"] == "not defined where both masks empty: a; reference empty: c"
    assert x["hd95"]["mean"] is None and x["hd95"]["n_excluded"] == 3
    assert x["specificity"]["n_excluded"] == 1
    assert x["specificity"]["excluded_reason"] == "not defined where reference has no background: c"
    assert summary["mean_dice"] == pytest.approx((0.5 + 0.0) / 2)
    assert summarize(per_case, dice_labels=["x"])["mean_dice"] == pytest.approx(0.5)


def test_evaluate_folders_writes_summary_and_csv(folders, tmp_path: Path):
    ref_dir, pred_dir = folders
    out = tmp_path / "out" / "nested"  # created on demand
    summary = evaluate_folders(ref_dir, pred_dir, SPEC, out / "summary.json", out / "summary.csv")

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert on_disk["schema_version"] == 3  # 3: nsd area-weighted, nsd_voxel, missing_distance
    assert on_disk["tolerance_mm"] == 1.0
    assert on_disk["units"]["hd95"] == "mm" and on_disk["units"]["reference_volume_ml"] == "mL"
    assert "empty" in on_disk["empty_rules"].lower()
    assert on_disk["mean_dice_labels"] == ["liver", "tumour"]
    assert [(r["case"], r["label"]) for r in on_disk["per_case"]] == [
        (case, label) for case in ("case01", "case02") for label in ("liver", "tumour", "liver_and_tumour")
    ]
    first = on_disk["per_case"][0]
    assert first["dice"] == pytest.approx(0.8)
    assert first["hd95"] == pytest.approx(3.0)
    assert first["hd"] == pytest.approx(3.0)
    # one 3 mm slice off: of each cube's 98 boundary voxels, 64 + 8 lie within 1 mm of the other surface
    assert first["nsd_voxel"] == pytest.approx(72 / 98)
    # by surfel area (worked out in tests/evaluation/test_nsd.py): all but the far face and the 4 centre
    # surfels of the near one, whose 12 outer surfels are 1 mm from the side walls
    assert first["nsd"] == pytest.approx(LIVER_NSD_1MM)
    assert first["voe"] == pytest.approx(1 - 100 / 150) and first["rvd"] == 0.0
    assert first["specificity"] == pytest.approx(1 - 25 / (10 * 12 * 12 - 125))
    assert first["reference_volume_ml"] == pytest.approx(125 * 3 / 1000)

    mean = on_disk["mean"]
    assert mean["liver"]["n_cases"] == 2
    assert mean["liver"]["dice"]["mean"] == pytest.approx((0.8 + 1.0) / 2)
    assert mean["liver"]["hd95"]["median"] == pytest.approx((3.0 + 0.0) / 2)
    assert mean["tumour"]["dice"]["mean"] == 1.0
    assert mean["tumour"]["dice"]["n_excluded"] == 1
    assert "case02" in mean["tumour"]["dice"]["excluded_reason"]
    assert mean["liver_and_tumour"]["dice"]["mean"] == pytest.approx((108 / 133 + 1.0) / 2)
    # Regions are not part of mean_dice: it is the mean of liver (0.9) and tumour (1.0).
    assert on_disk["mean_dice"] == pytest.approx(0.95)

    with open(out / "summary.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    required = "case label dice iou precision recall specificity voe rvd hd hd95 assd nsd tp fp fn tn".split()
    assert set(required) <= set(CSV_COLUMNS)
    assert {"reference_volume_ml", "predicted_volume_ml"} <= set(CSV_COLUMNS)
    assert set(CSV_COLUMNS) - {"case", "label"} == set(first) - {"case", "label"}  # JSON keys = CSV columns
    assert len(rows) == 6
    assert float(rows[0]["dice"]) == pytest.approx(0.8)
    assert int(rows[0]["tp"]) == 100
    tumour_case02 = next(r for r in rows if r["case"] == "case02" and r["label"] == "tumour")
    assert tumour_case02["dice"] == "" and tumour_case02["hd95"] == "" and tumour_case02["nsd"] == ""
    assert float(tumour_case02["specificity"]) == 1.0

    # report.png beside summary.json; atomic writes leave no temporary files behind.
    assert sorted(p.name for p in out.iterdir()) == ["report.png", "summary.csv", "summary.json"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outputs_are_optional_and_workers_do_not_change_results(folders, tmp_path: Path):
    ref_dir, pred_dir = folders
    one = evaluate_folders(ref_dir, pred_dir, SPEC, workers=1)
    three = evaluate_folders(ref_dir, pred_dir, SPEC, workers=3)
    assert one == three
    with pytest.raises(ValueError, match="workers"):
        evaluate_folders(ref_dir, pred_dir, SPEC, workers=0)
    out = tmp_path / "no_report"
    evaluate_folders(ref_dir, pred_dir, SPEC, out / "summary.json", report_png=False)
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


def test_tolerance_sets_nsd_and_is_recorded(folders):
    ref_dir, pred_dir = folders
    # the liver of case01 is one 3 mm slice off: every boundary voxel is within 3 mm of the other surface
    summary = evaluate_folders(ref_dir, pred_dir, SPEC, tolerance_mm=3.0)
    assert summary["tolerance_mm"] == 3.0
    assert summary["per_case"][0]["nsd"] == 1.0
    at_zero = evaluate_folders(ref_dir, pred_dir, SPEC, tolerance_mm=0.0)["per_case"][0]
    assert at_zero["nsd_voxel"] == pytest.approx(64 / 98)
    assert at_zero["nsd"] == pytest.approx(LIVER_NSD_0MM)
    with pytest.raises(ValueError, match="tolerance_mm"):
        evaluate_folders(ref_dir, pred_dir, SPEC, tolerance_mm=-1.0)


def test_evaluate_case_matches_whole_image_masks_for_labels_regions_and_ignore():
    # evaluate_case scores each structure in its bounding box; it must agree with whole-image masks.
    rng = np.random.default_rng(3)
    reference = np.zeros((9, 14, 15), dtype=np.uint8)
    reference[1:5, 2:9, 3:10] = 1
    reference[5:8, 6:12, 5:9] = 2
    reference[0, 0, 0:3] = 9  # ignored voxels, on the array edge
    prediction = reference.copy()
    prediction[rng.random(reference.shape) < 0.08] = 2
    prediction[2:4, 10:13, 11:14] = 1  # a false positive far from the liver
    labels = {"background": 0, "liver": 1, "tumour": 2, "absent": 3}
    regions = {"liver_and_tumour": (1, 2), "tumour_or_absent": (2, 3)}
    spacing = (2.5, 0.9, 1.1)
    result = evaluate_case(reference, prediction.astype(np.float32), spacing, labels, regions, 9, 2.0)
    kept = reference != 9
    for name, values in structures(labels, regions).items():
        expected = binary_metrics(
            np.isin(reference, values) & kept, np.isin(prediction, values) & kept, spacing, 2.0
        )
        assert result[name] == pytest.approx(expected), name
    assert result["absent"]["dice"] is None and result["absent"]["tn"] == reference.size


def write_images(folder: Path, cases: dict[str, np.ndarray]) -> Path:
    folder.mkdir()
    for case, labels in cases.items():
        image = labels.astype(np.float32) * 100 + 10  # bright where labelled, like a contrast image
        write_labels(folder / f"{case}_0000.nii.gz", image, dtype=np.float32)
    return folder


def test_overlays_one_png_per_case_with_or_without_images(folders, tmp_path: Path):
    ref_dir, pred_dir = folders
    images = write_images(tmp_path / "images", {"case01": liver_cube(1), "case02": liver_cube(1)})
    with_images = tmp_path / "overlays"
    evaluate_folders(ref_dir, pred_dir, SPEC, overlays_dir=with_images, images_dir=images)
    assert sorted(p.name for p in with_images.iterdir()) == ["case01.png", "case02.png"]
    labels_only = tmp_path / "overlays_labels"
    evaluate_folders(ref_dir, pred_dir, SPEC, overlays_dir=labels_only)
    assert sorted(p.name for p in labels_only.iterdir()) == ["case01.png", "case02.png"]
    assert (labels_only / "case01.png").read_bytes() != (with_images / "case01.png").read_bytes()


def test_overlay_image_missing_or_misshapen_names_the_file(folders, tmp_path: Path):
    ref_dir, pred_dir = folders
    images = write_images(tmp_path / "images", {"case01": liver_cube(1)})
    with pytest.raises(AutosegError, match="no image") as info:
        evaluate_folders(ref_dir, pred_dir, SPEC, overlays_dir=tmp_path / "o", images_dir=images)
    assert str(images / "case02_0000.nii.gz") in str(info.value)
    write_labels(images / "case02_0000.nii.gz", np.zeros((10, 12, 11)))
    with pytest.raises(AutosegError, match="shape"):
        evaluate_folders(ref_dir, pred_dir, SPEC, overlays_dir=tmp_path / "o", images_dir=images)
    with pytest.raises(AutosegError, match="not found"):
        evaluate_folders(ref_dir, pred_dir, SPEC, overlays_dir=tmp_path / "o", images_dir=tmp_path / "none")


def test_mismatched_shape_names_the_prediction_file(folders):
    ref_dir, pred_dir = folders
    bad = write_labels(pred_dir / "case02.nii.gz", np.zeros((10, 12, 13)))
    with pytest.raises(AutosegError, match="shape") as info:
        evaluate_folders(ref_dir, pred_dir, SPEC)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message


def test_mismatched_spacing_names_the_prediction_file(folders):
    ref_dir, pred_dir = folders
    bad = write_labels(pred_dir / "case01.nii.gz", liver_cube(1), spacing_mm=(1.0, 1.0, 1.0))
    with pytest.raises(AutosegError, match="spacing") as info:
        evaluate_folders(ref_dir, pred_dir, SPEC)
    assert str(bad) in str(info.value)


def test_prediction_without_reference_names_it(folders):
    ref_dir, pred_dir = folders
    stray = write_labels(pred_dir / "case09.nii.gz", liver_cube(1))
    with pytest.raises(AutosegError, match="no reference") as info:
        evaluate_folders(ref_dir, pred_dir, SPEC)
    assert str(stray) in str(info.value)


def test_empty_prediction_folder_is_an_error(folders, tmp_path: Path):
    ref_dir, _ = folders
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.txt").write_text("no predictions here")
    with pytest.raises(AutosegError, match="no predictions") as info:
        evaluate_folders(ref_dir, empty, SPEC)
    assert str(empty) in str(info.value)
    with pytest.raises(AutosegError, match="not found"):
        evaluate_folders(ref_dir, tmp_path / "absent", SPEC)


def test_undeclared_label_value_in_prediction_is_an_error(folders):
    ref_dir, pred_dir = folders
    labels = liver_cube(1)
    labels[0, 0, 0] = 7
    bad = write_labels(pred_dir / "case02.nii.gz", labels)
    with pytest.raises(AutosegError, match=r"\[7\]") as info:
        evaluate_folders(ref_dir, pred_dir, SPEC)
    assert str(bad) in str(info.value)


def _real_labels_or_skip() -> Path:
    labels_dir = SPINAL_CORD / "labelsTr"
    if not labels_dir.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}: ../shared/data is absent (e.g. fresh clone)")
    return labels_dir


@pytest.mark.realdata
def test_real_spinal_cord_eroded_prediction_and_self_comparison(tmp_path: Path):
    labels_dir = _real_labels_or_skip()
    spec = load_dataset_json(SPINAL_CORD)
    pred_dir = tmp_path / "eroded"
    cases = []
    for path in sorted(labels_dir.glob(f"*{spec.file_ending}")):
        reference = read_volume(path, dtype=None)
        labels = np.rint(reference.array).astype(np.uint8)
        eroded = np.zeros_like(labels)
        for value in spec.foreground_labels.values():
            eroded[ndimage.binary_erosion(labels == value)] = value
        write_volume(eroded, reference.geometry, pred_dir / path.name)
        cases.append(path.name[: -len(spec.file_ending)])
    assert len(cases) == 5

    summary = evaluate_folders(
        labels_dir, pred_dir, spec, tmp_path / "summary.json", tmp_path / "summary.csv"
    )
    rows = summary["per_case"]
    assert [r["case"] for r in rows] == cases
    for row in rows:
        assert 0.3 < row["dice"] < 0.99, row
        assert row["precision"] == 1.0  # an eroded mask lies inside the reference
        assert row["hd95"] > 0 and row["hd"] >= row["hd95"]
        assert row["rvd"] < 0 and 0 < row["nsd"] <= 1
    assert 0.3 < summary["mean_dice"] < 0.99

    itself = evaluate_folders(labels_dir, labels_dir, spec, workers=3)
    for row in itself["per_case"]:
        assert row["dice"] == 1.0 and row["hd"] == 0.0 and row["assd"] == 0.0 and row["nsd"] == 1.0
    assert itself["mean_dice"] == 1.0
