"""Metrics on masks small enough to work out on paper."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoseg.evaluation.metrics import binary_metrics, confusion, surface_distances


def cube(shape: tuple[int, int, int], start: tuple[int, int, int], size: int = 5) -> np.ndarray:
    """A boolean ``size``³ cube with its first corner at ``start``."""
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def test_confusion_counts_each_voxel_once():
    reference = np.array([[1, 1, 0, 0]], dtype=bool)
    prediction = np.array([[1, 0, 1, 0]], dtype=bool)
    assert confusion(reference, prediction) == (1, 1, 1, 1)


def test_confusion_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        confusion(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


def test_two_cubes_offset_by_one_voxel():
    # 5x5x5 cubes shifted by one slice overlap in 4x5x5 = 100 voxels; each has 125.
    reference = cube((9, 9, 9), (1, 1, 1))
    prediction = cube((9, 9, 9), (2, 1, 1))
    m = binary_metrics(reference, prediction, (1.0, 1.0, 1.0))
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (100, 25, 25, 729 - 150)
    assert m["dice"] == pytest.approx(2 * 100 / (125 + 125))  # 0.8
    assert m["iou"] == pytest.approx(100 / 150)
    assert m["precision"] == pytest.approx(0.8)
    assert m["recall"] == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("shift_axis", "spacing_mm", "hd95_mm", "assd_mm"),
    [
        # Shift along z with 3 mm slices. Of the shifted cube's 98 boundary voxels, 64 lie on the reference
        # surface (0 mm), the 25 of the new top face are one slice away (3 mm), and the 9 inner voxels of the
        # bottom face are nearest to a side face: 8 at 1 mm, the centre at 2 mm. Mean = (8 + 2 + 75) / 98;
        # the 95th percentile falls inside the 3 mm group. Both directions are mirror images.
        (0, (3.0, 1.0, 1.0), 3.0, 85 / 98),
        # Same spacing, shift along x: the new face is 1 mm away and so is every inner voxel of the old one.
        (2, (3.0, 1.0, 1.0), 1.0, 34 / 98),
        (0, (1.0, 1.0, 1.0), 1.0, 34 / 98),
    ],
)
def test_single_voxel_shift_gives_hd95_equal_to_spacing_along_the_shift(
    shift_axis, spacing_mm, hd95_mm, assd_mm
):
    start = [2, 2, 2]
    reference = cube((10, 10, 10), tuple(start))
    start[shift_axis] += 1
    prediction = cube((10, 10, 10), tuple(start))
    m = binary_metrics(reference, prediction, spacing_mm)
    assert m["hd95_mm"] == pytest.approx(hd95_mm)
    assert m["assd_mm"] == pytest.approx(assd_mm)


def test_identical_masks_are_perfect():
    mask = cube((8, 8, 8), (1, 2, 3), size=4)
    m = binary_metrics(mask, mask, (2.0, 1.0, 0.5))
    assert m["dice"] == 1.0 and m["iou"] == 1.0 and m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["hd95_mm"] == 0.0 and m["assd_mm"] == 0.0


def test_surface_distances_one_entry_per_boundary_voxel():
    reference = cube((9, 9, 9), (1, 1, 1))
    prediction = cube((9, 9, 9), (2, 1, 1))
    ref_to_pred, pred_to_ref = surface_distances(reference, prediction, (1.0, 1.0, 1.0))
    assert ref_to_pred.shape == pred_to_ref.shape == (125 - 27,)  # surface = cube minus its 3x3x3 core
    with pytest.raises(ValueError, match="empty"):
        surface_distances(reference, np.zeros_like(reference), (1.0, 1.0, 1.0))


def test_result_does_not_depend_on_background_around_the_masks():
    # Metrics crop to the masks internally; a mask on the array edge counts its edge voxels as surface.
    small_ref = cube((5, 6, 5), (0, 0, 0))
    small_pred = cube((5, 6, 5), (0, 1, 0))
    big_ref = np.pad(small_ref, 7)
    big_pred = np.pad(small_pred, 7)
    small = binary_metrics(small_ref, small_pred, (3.0, 1.0, 2.0))
    big = binary_metrics(big_ref, big_pred, (3.0, 1.0, 2.0))
    for key in ("dice", "hd95_mm", "assd_mm", "tp", "fp", "fn"):
        assert small[key] == pytest.approx(big[key])
    assert small["hd95_mm"] == pytest.approx(1.0)


def test_both_empty_leaves_overlap_and_distances_undefined():
    empty = np.zeros((4, 4, 4), dtype=bool)
    m = binary_metrics(empty, empty, (1.0, 1.0, 1.0))
    for key in ("dice", "iou", "precision", "recall", "hd95_mm", "assd_mm"):
        assert m[key] is None, key
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (0, 0, 0, 64)
    assert m["reference_volume_ml"] == 0.0 and m["predicted_volume_ml"] == 0.0


def test_empty_reference_with_prediction_scores_zero():
    reference = np.zeros((4, 4, 4), dtype=bool)
    prediction = reference.copy()
    prediction[1, 1, 1] = True
    m = binary_metrics(reference, prediction, (1.0, 1.0, 1.0))
    assert m["dice"] == 0.0 and m["iou"] == 0.0 and m["precision"] == 0.0
    assert m["recall"] is None and m["hd95_mm"] is None and m["assd_mm"] is None


def test_empty_prediction_with_reference_scores_zero():
    reference = np.zeros((4, 4, 4), dtype=bool)
    reference[1, 1, 1] = True
    prediction = np.zeros_like(reference)
    m = binary_metrics(reference, prediction, (1.0, 1.0, 1.0))
    assert m["dice"] == 0.0 and m["iou"] == 0.0 and m["recall"] == 0.0
    assert m["precision"] is None and m["hd95_mm"] is None and m["assd_mm"] is None


def test_volumes_in_millilitres():
    # 10x10x10 voxels of 2x1x1 mm = 2000 mm³ = 2 mL; 5x5x5 voxels of 2 mm³ = 250 mm³ = 0.25 mL.
    reference = cube((12, 12, 12), (1, 1, 1), size=10)
    prediction = cube((12, 12, 12), (1, 1, 1), size=5)
    m = binary_metrics(reference, prediction, (2.0, 1.0, 1.0))
    assert m["reference_volume_ml"] == pytest.approx(2.0)
    assert m["predicted_volume_ml"] == pytest.approx(0.25)


def test_nonzero_integers_count_as_foreground_and_results_are_json_ready():
    reference = cube((9, 9, 9), (1, 1, 1)).astype(np.uint8) * 3
    m = binary_metrics(reference, reference > 0, (1.0, 1.0, 1.0))
    assert m["dice"] == 1.0
    assert json.loads(json.dumps(m)) == m  # plain Python numbers, no numpy scalars


@pytest.mark.parametrize("spacing_mm", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, float("nan"), 1.0)])
def test_bad_spacing_is_rejected(spacing_mm):
    mask = cube((9, 9, 9), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing_mm"):
        binary_metrics(mask, mask, spacing_mm)
