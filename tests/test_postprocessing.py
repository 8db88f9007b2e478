"""Largest-connected-component postprocessing on hand-made label maps, and the validation rule that picks it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.io.dataset import DatasetSpec, load_dataset_json
from autoseg.jsonio import write_json
from autoseg.postprocessing import (
    Postprocessing,
    apply_postprocessing,
    decide_postprocessing,
    keep_largest_component,
    keep_largest_foreground,
)

ORGAN, LESION = 1, 2
STRUCTURES = {"organ": (1,), "lesion": (2,), "organ_or_lesion": (1, 2)}


def test_two_blobs_only_the_larger_is_kept():
    seg = np.zeros((5, 7, 7), dtype=np.uint8)
    seg[0:2, 0:2, 0:2] = ORGAN  # 8 voxels
    seg[4, 6, 6] = ORGAN  # 1 voxel, far away
    seg[4, 0, 0] = LESION  # another structure: untouched
    out = keep_largest_component(seg, {"organ": (ORGAN,)})
    expected = seg.copy()
    expected[4, 6, 6] = 0
    np.testing.assert_array_equal(out, expected)
    assert seg[4, 6, 6] == ORGAN  # the input is not modified
    assert out.dtype == seg.dtype
    # a list of value tuples works the same as a mapping
    np.testing.assert_array_equal(keep_largest_component(seg, [(ORGAN,)]), expected)


def test_voxels_touching_at_a_corner_are_one_component():
    seg = np.zeros((4, 4, 4), dtype=np.uint8)
    seg[0:2, 0:2, 0:2] = ORGAN
    seg[2, 2, 2] = ORGAN  # touches (1, 1, 1) only at a corner: full connectivity keeps it
    np.testing.assert_array_equal(keep_largest_component(seg, [(ORGAN,)]), seg)


def test_region_components_count_all_of_its_values():
    seg = np.zeros((6, 8, 8), dtype=np.uint8)
    seg[0:3, 0:3, 0:3] = ORGAN  # 27 voxels
    seg[1, 1, 1] = LESION  # lesion inside the organ: one region component of 27 voxels
    seg[5, 6:8, 6:8] = LESION  # lesion elsewhere: 4 voxels
    # as a label, the outside lesion (4 voxels) is the larger lesion component and stays; the inner one goes
    by_label = keep_largest_component(seg, [(LESION,)])
    assert by_label[1, 1, 1] == 0 and (by_label[5, 6:8, 6:8] == LESION).all()
    # as a region (organ or lesion), the organ with its inner lesion is the largest and the outside lesion goes
    by_region = keep_largest_component(seg, {"organ_or_lesion": (ORGAN, LESION)})
    assert by_region[1, 1, 1] == LESION and (by_region[5, 6:8, 6:8] == 0).all()
    assert (by_region[0:3, 0:3, 0:3] > 0).all()


def test_whole_foreground_treats_all_labels_as_one_structure():
    seg = np.zeros((6, 8, 8), dtype=np.uint8)
    seg[0:3, 0:3, 0:3] = ORGAN  # 27 voxels, the only organ component
    seg[5, 6:8, 6:8] = LESION  # 4 voxels, the only lesion component
    np.testing.assert_array_equal(keep_largest_component(seg, [(ORGAN,), (LESION,)]), seg)
    out = keep_largest_foreground(seg)
    assert (out[5] == 0).all() and (out[0:3, 0:3, 0:3] == ORGAN).all()


def test_empty_masks_and_ties():
    empty = np.zeros((3, 3, 3), dtype=np.uint8)
    np.testing.assert_array_equal(keep_largest_component(empty, [(ORGAN,)]), empty)
    np.testing.assert_array_equal(keep_largest_foreground(empty), empty)
    seg = np.zeros((1, 1, 5), dtype=np.uint8)
    seg[0, 0, [0, 4]] = ORGAN  # two one-voxel components: the first in C order stays
    np.testing.assert_array_equal(keep_largest_component(seg, [(ORGAN,)]), [[[1, 0, 0, 0, 0]]])


def test_postprocessing_json_round_trip_and_apply():
    pp = Postprocessing(keep_largest_foreground=True, keep_largest=("lesion",))
    d = json.loads(json.dumps(pp.to_json()))
    assert d == {"keep_largest_foreground": True, "keep_largest": ["lesion"]}
    assert Postprocessing.from_json(d) == pp
    assert Postprocessing().is_identity and not pp.is_identity
    for bad in ({"keep_largest_foreground": "yes"}, {"keep_largest": "organ"}, {"largest": []}, []):
        with pytest.raises(ValueError):
            Postprocessing.from_json(bad)

    seg = np.zeros((6, 8, 8), dtype=np.uint8)
    seg[0:3, 0:3, 0:3] = ORGAN
    seg[5, 7, 7] = ORGAN  # small stray organ
    seg[5, 0, 7] = LESION  # small stray lesion
    np.testing.assert_array_equal(apply_postprocessing(seg, Postprocessing(), STRUCTURES), seg)
    organ_only = apply_postprocessing(seg, Postprocessing(keep_largest=("organ",)), STRUCTURES)
    assert organ_only[5, 7, 7] == 0 and organ_only[5, 0, 7] == LESION
    everything = apply_postprocessing(seg, Postprocessing(keep_largest_foreground=True), STRUCTURES)
    assert everything[5].sum() == 0 and everything.sum() == 27 * ORGAN
    with pytest.raises(ValueError, match="tumour"):
        apply_postprocessing(seg, Postprocessing(keep_largest=("tumour",)), STRUCTURES)


# --- decide_postprocessing on NIfTI folders --------------------------------------------------------------

SHAPE = (8, 16, 16)


def _write(path: Path, array: np.ndarray) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing((1.0, 1.0, 2.0))  # (x, y, z): 2 mm slices
    image.SetOrigin((5.0, -3.0, 1.0))
    sitk.WriteImage(image, str(path))


def _spec(tmp_path: Path, regions: dict | None = None) -> DatasetSpec:
    raw = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "file_ending": ".nii.gz",
    }
    if regions:
        raw["regions"] = regions
    write_json(tmp_path / "dataset.json", raw)
    return load_dataset_json(tmp_path / "dataset.json")


def _folders(tmp_path: Path, reference: np.ndarray, prediction: np.ndarray) -> tuple[Path, Path]:
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    _write(ref_dir / "case01.nii.gz", reference)
    _write(pred_dir / "case01.nii.gz", prediction)
    return ref_dir, pred_dir


def _organ_with_lesion() -> np.ndarray:
    """Organ cube [1:5]^3 (64 voxels) with a 2x2x2 lesion inside: organ 56 voxels, lesion 8."""
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[1:5, 1:5, 1:5] = ORGAN
    seg[2:4, 2:4, 2:4] = LESION
    return seg


def test_decide_keeps_organ_lcc_but_not_a_lesion_lcc_that_would_hurt(tmp_path):
    """The lesion really has two parts; the prediction adds a stray organ blob.

    Reference: organ 56 voxels, lesion 8 (inside) + 4 (apart) = 12. Prediction: the reference plus a stray
    organ blob of 2x3x3 = 18 voxels: organ Dice 2*56 / (56 + 74) = 112/130, lesion 1.
    * whole foreground keeps only organ+inner lesion (64 voxels): removes the stray blob (organ -> 1) but also
      the outer lesion (lesion -> 2*8/(8+12) = 0.8): a drop, rejected.
    * organ LCC removes the stray blob: organ -> 1, lesion stays 1: kept.
    * lesion LCC keeps the 8-voxel part and drops the 4-voxel one: lesion 0.8, rejected.
    """
    spec = _spec(tmp_path)
    reference = _organ_with_lesion()
    reference[5:7, 10:12, 10] = LESION  # 4 voxels, apart from the organ
    prediction = reference.copy()
    prediction[0:2, 12:15, 1:4] = ORGAN  # 18 stray voxels
    ref_dir, pred_dir = _folders(tmp_path, reference, prediction)
    out_dir = tmp_path / "pp"

    pp, report = decide_postprocessing(ref_dir, pred_dir, spec, out_dir, workers=1)

    assert pp == Postprocessing(keep_largest_foreground=False, keep_largest=("organ",))
    assert report["baseline"]["dice"] == pytest.approx({"organ": 112 / 130, "lesion": 1.0})
    steps = {s["step"]: s for s in report["steps"]}
    assert [s["step"] for s in report["steps"]] == ["foreground", "organ", "lesion"]
    assert steps["foreground"]["dice"] == pytest.approx({"organ": 1.0, "lesion": 0.8})
    assert not steps["foreground"]["kept"] and "lesion 1.0000 -> 0.8000" in steps["foreground"]["reason"]
    assert steps["organ"]["kept"] and steps["organ"]["dice"] == pytest.approx({"organ": 1.0, "lesion": 1.0})
    assert not steps["lesion"]["kept"] and steps["lesion"]["dice"]["lesion"] == pytest.approx(0.8)
    assert report["final"]["mean_dice"] == pytest.approx(1.0)
    # the folder written is the prediction after the chosen postprocessing, i.e. the reference here
    written = sitk.ReadImage(str(out_dir / "case01.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), reference)
    assert written.GetOrigin() == (5.0, -3.0, 1.0) and written.GetSpacing() == (1.0, 1.0, 2.0)
    assert json.loads((out_dir / "summary.json").read_text())["mean_dice"] == pytest.approx(1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dataset.json",
        "pp",
        "pred",
        "ref",
    ]  # no trials left
    # the input folder is unchanged
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / "case01.nii.gz"))), prediction
    )


def test_a_step_that_helps_its_structure_but_hurts_another_is_not_kept(tmp_path):
    """Region organ_or_lesion = {1, 2}. The organ really has two parts; the prediction adds a stray lesion.

    Reference: organ 56 + 8 (apart) = 64 voxels, lesion 8, region 72. Prediction: the reference plus a stray
    lesion cube of 27 voxels: organ 1, lesion 16/43, region 144/171.
    The region's LCC (the organ-with-lesion cube, 64 voxels) removes the stray lesion *and* the second organ
    part: region -> 128/136 and lesion -> 1 improve, but organ -> 112/120 drops, so it is rejected.
    Every other step drops something too, so nothing is done.
    """
    spec = _spec(tmp_path, regions={"organ_or_lesion": [1, 2]})
    reference = _organ_with_lesion()
    reference[5:7, 10:12, 10:12] = ORGAN  # 8 voxels of organ, apart
    prediction = reference.copy()
    prediction[0:3, 11:14, 1:4] = LESION  # 27 stray voxels
    ref_dir, pred_dir = _folders(tmp_path, reference, prediction)

    pp, report = decide_postprocessing(ref_dir, pred_dir, spec, tmp_path / "pp", workers=1)

    assert pp == Postprocessing()
    assert report["baseline"]["dice"] == pytest.approx(
        {"organ": 1.0, "lesion": 16 / 43, "organ_or_lesion": 144 / 171}
    )
    region = report["steps"][-1]
    assert region["step"] == "organ_or_lesion" and region["values"] == [1, 2]
    assert region["dice"] == pytest.approx({"organ": 112 / 120, "lesion": 1.0, "organ_or_lesion": 128 / 136})
    assert not region["kept"] and "organ 1.0000 -> 0.9333" in region["reason"]
    assert [s["kept"] for s in report["steps"]] == [False, False, False, False]
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pp" / "case01.nii.gz"))), prediction
    )


def test_steps_that_change_nothing_are_not_kept(tmp_path):
    """The foreground LCC removes a stray organ blob (organ 112/120 -> 1) and is kept; the organ and lesion
    LCCs then change no voxel: no evidence for them, so they are not kept."""
    spec = _spec(tmp_path)
    reference = _organ_with_lesion()
    prediction = reference.copy()
    prediction[6:8, 12:14, 12:14] = ORGAN  # 8 stray voxels
    ref_dir, pred_dir = _folders(tmp_path, reference, prediction)

    pp, report = decide_postprocessing(ref_dir, pred_dir, spec, tmp_path / "pp", workers=1)

    assert pp == Postprocessing(keep_largest_foreground=True, keep_largest=())
    assert [s["changed_cases"] for s in report["steps"]] == [1, 0, 0]
    assert [s["kept"] for s in report["steps"]] == [True, False, False]
    assert "no evidence" in report["steps"][1]["reason"]
    assert report["baseline"]["dice"]["organ"] == pytest.approx(112 / 120)
    assert report["final"]["dice"] == pytest.approx({"organ": 1.0, "lesion": 1.0})
