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
from autoseg.io.dataset import DatasetSpec, load_dataset_json
from autoseg.io.volume import read_volume, write_volume

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPINAL_CORD = SHARED_DATA / "Dataset003_SpinalCordTiny"

SPACING_MM = (3.0, 1.0, 1.0)  # array order (z, y, x): thick slices
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
    assert result["liver"]["hd95_mm"] == pytest.approx(3.0)
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
            metrics.update(dict.fromkeys(("iou", "precision", "recall", "hd95_mm", "assd_mm"), None))
            metrics.update(reference_volume_ml=1.0, predicted_volume_ml=2.0, tn=0)
    summary = summarize(per_case)
    x, y = summary["mean"]["x"], summary["mean"]["y"]
    assert x["n_cases"] == 3
    assert x["dice"] == {"mean": 0.5, "median": 0.5, "n_excluded": 0, "excluded_reason": None}
    assert y["dice"]["mean"] == 0.0 and y["dice"]["n_excluded"] == 2
    assert y["dice"]["excluded_reason"] == "not defined where both masks empty: a; reference empty: c"
    assert x["hd95_mm"]["mean"] is None and x["hd95_mm"]["n_excluded"] == 3
    assert summary["mean_dice"] == pytest.approx((0.5 + 0.0) / 2)
    assert summarize(per_case, dice_labels=["x"])["mean_dice"] == pytest.approx(0.5)


def test_evaluate_folders_writes_summary_and_csv(folders, tmp_path: Path):
    ref_dir, pred_dir = folders
    out = tmp_path / "out" / "nested"  # created on demand
    summary = evaluate_folders(ref_dir, pred_dir, SPEC, out / "summary.json", out / "summary.csv")

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert on_disk["schema_version"] == 1
    assert "empty" in on_disk["empty_rules"].lower()
    assert on_disk["mean_dice_labels"] == ["liver", "tumour"]
    assert [(r["case"], r["label"]) for r in on_disk["per_case"]] == [
        (case, label) for case in ("case01", "case02") for label in ("liver", "tumour", "liver_and_tumour")
    ]
    first = on_disk["per_case"][0]
    assert first["dice"] == pytest.approx(0.8)
    assert first["hd95_mm"] == pytest.approx(3.0)
    assert first["reference_volume_ml"] == pytest.approx(125 * 3 / 1000)

    mean = on_disk["mean"]
    assert mean["liver"]["n_cases"] == 2
    assert mean["liver"]["dice"]["mean"] == pytest.approx((0.8 + 1.0) / 2)
    assert mean["liver"]["hd95_mm"]["median"] == pytest.approx((3.0 + 0.0) / 2)
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
    assert len(rows) == 6
    assert float(rows[0]["dice"]) == pytest.approx(0.8)
    assert int(rows[0]["tp"]) == 100
    tumour_case02 = next(r for r in rows if r["case"] == "case02" and r["label"] == "tumour")
    assert tumour_case02["dice"] == "" and tumour_case02["hd95_mm"] == ""

    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv", "summary.json"]


def test_outputs_are_optional_and_workers_do_not_change_results(folders):
    ref_dir, pred_dir = folders
    one = evaluate_folders(ref_dir, pred_dir, SPEC, workers=1)
    three = evaluate_folders(ref_dir, pred_dir, SPEC, workers=3)
    assert one == three
    with pytest.raises(ValueError, match="workers"):
        evaluate_folders(ref_dir, pred_dir, SPEC, workers=0)


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
        assert row["hd95_mm"] > 0
    assert 0.3 < summary["mean_dice"] < 0.99

    itself = evaluate_folders(labels_dir, labels_dir, spec, workers=3)
    for row in itself["per_case"]:
        assert row["dice"] == 1.0 and row["hd95_mm"] == 0.0 and row["assd_mm"] == 0.0
    assert itself["mean_dice"] == 1.0
