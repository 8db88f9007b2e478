"""Metrics on masks small enough to work out on paper."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from autoseg.evaluation.metrics import METRIC_KEYS, binary_metrics, confusion, surface_distances


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
    assert m["specificity"] == pytest.approx(579 / (579 + 25))  # TN / (TN + FP): the reference's background
    assert m["voe"] == pytest.approx(1 - 100 / 150)
    assert m["rvd"] == 0.0  # same volume, wherever it is
    assert tuple(m) == METRIC_KEYS


# Area-weighted NSD of the z-shift with 3 mm slices at 1 mm (worked out in tests/evaluation/test_nsd.py): each
# cube has 312.9 mm² of surfels; all are within 1 mm except the far face and the 4 centre surfels of the near one
_CUBE_AREA = 32 + 16 * 10**0.5 + 19**0.5 + 192 + 24 * 2**0.5
_Z_SHIFT_NSD = (204 + 24 * 2**0.5 + 8 * 10**0.5 + 19**0.5 / 2) / _CUBE_AREA  # 0.848


@pytest.mark.parametrize(
    ("shift_axis", "spacing_mm", "hd95", "assd", "nsd_voxel", "nsd"),
    [
        # Shift along z with 3 mm slices. Of the shifted cube's 98 boundary voxels, 64 lie on the reference
        # surface (0 mm), the 25 of the new top face are one slice away (3 mm), and the 9 inner voxels of the
        # bottom face are nearest to a side face: 8 at 1 mm, the centre at 2 mm. Mean = (8 + 2 + 75) / 98;
        # the 95th percentile falls inside the 3 mm group. Both directions are mirror images, so the NSD at
        # 1 mm is (64 + 8) / 98 on each side by voxel count.
        (0, (3.0, 1.0, 1.0), 3.0, 85 / 98, 72 / 98, _Z_SHIFT_NSD),
        # Same spacing, shift along x: the new face is 1 mm away and so is every inner voxel of the old one.
        (2, (3.0, 1.0, 1.0), 1.0, 34 / 98, 1.0, 1.0),
        (0, (1.0, 1.0, 1.0), 1.0, 34 / 98, 1.0, 1.0),
    ],
)
def test_single_voxel_shift_gives_hd95_equal_to_spacing_along_the_shift(
    shift_axis, spacing_mm, hd95, assd, nsd_voxel, nsd
):
    start = [2, 2, 2]
    reference = cube((10, 10, 10), tuple(start))
    start[shift_axis] += 1
    prediction = cube((10, 10, 10), tuple(start))
    m = binary_metrics(reference, prediction, spacing_mm)
    assert m["hd95"] == pytest.approx(hd95)
    assert m["hd"] == pytest.approx(hd95)  # the largest distance is the 95th percentile here
    assert m["assd"] == pytest.approx(assd)
    assert m["nsd_voxel"] == pytest.approx(nsd_voxel)
    assert m["nsd"] == pytest.approx(nsd)


@pytest.mark.parametrize(
    ("tolerance_mm", "nsd"),
    # distances of the z-shift above, on each side: 64 at 0 mm, 8 at 1 mm, 1 at 2 mm, 25 at 3 mm;
    # a distance equal to the tolerance counts as within it
    [(0.0, 64 / 98), (1.0, 72 / 98), (1.9, 72 / 98), (2.0, 73 / 98), (2.9, 73 / 98), (3.0, 1.0), (50.0, 1.0)],
)
def test_nsd_voxel_counts_boundary_voxels_within_the_tolerance(tolerance_mm, nsd):
    reference = cube((10, 10, 10), (2, 2, 2))
    prediction = cube((10, 10, 10), (3, 2, 2))
    m = binary_metrics(reference, prediction, (3.0, 1.0, 1.0), tolerance_mm=tolerance_mm)
    assert m["nsd_voxel"] == pytest.approx(nsd)


def test_a_stray_voxel_sets_hd_but_not_hd95_and_weighs_in_assd_and_nsd():
    # A 5x5x5 cube (z 2..6) predicted exactly, plus one stray voxel four 3 mm slices above its top face:
    # 12 mm from the nearest reference boundary voxel (6, 4, 4). The prediction has 98 + 1 boundary voxels.
    reference = cube((14, 10, 10), (2, 2, 2))
    prediction = reference.copy()
    prediction[10, 4, 4] = True
    m = binary_metrics(reference, prediction, (3.0, 1.0, 1.0))
    assert m["hd"] == pytest.approx(12.0)
    # 95th percentile of 98 zeros and one 12: rank 0.95 * 98 = 93.1 falls among the zeros
    assert m["hd95"] == 0.0
    # mean over both surfaces, 98 + 99 voxels (the mean of the two directed means would be 12 / 99 / 2)
    assert m["assd"] == pytest.approx(12 / 197)
    assert m["nsd_voxel"] == pytest.approx(196 / 197)
    # by area: the stray voxel's 8 vertex surfels (sqrt(19)/8 mm² each) are missed, both cubes' surfels match
    assert m["nsd"] == pytest.approx(2 * _CUBE_AREA / (2 * _CUBE_AREA + 19**0.5))
    assert m["dice"] == pytest.approx(250 / 251)
    assert m["rvd"] == pytest.approx(1 / 125)


def test_identical_masks_are_perfect():
    mask = cube((8, 8, 8), (1, 2, 3), size=4)
    m = binary_metrics(mask, mask, (2.0, 1.0, 0.5))
    assert m["dice"] == 1.0 and m["iou"] == 1.0 and m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["specificity"] == 1.0 and m["voe"] == 0.0 and m["rvd"] == 0.0
    assert m["hd"] == 0.0 and m["hd95"] == 0.0 and m["assd"] == 0.0 and m["nsd"] == 1.0
    assert binary_metrics(mask, mask, (2.0, 1.0, 0.5), tolerance_mm=0.0)["nsd"] == 1.0


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
    for key in ("dice", "hd", "hd95", "assd", "nsd", "rvd", "tp", "fp", "fn"):
        assert small[key] == pytest.approx(big[key])
    assert small["hd95"] == pytest.approx(1.0)


def test_both_empty_leaves_overlap_and_distances_undefined():
    empty = np.zeros((4, 4, 4), dtype=bool)
    m = binary_metrics(empty, empty, (1.0, 1.0, 1.0))
    for key in ("dice", "iou", "voe", "precision", "recall", "rvd", "hd", "hd95", "assd", "nsd"):
        assert m[key] is None, key
    assert m["specificity"] == 1.0  # 64 true negatives, no false positive
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (0, 0, 0, 64)
    assert m["reference_volume_ml"] == 0.0 and m["predicted_volume_ml"] == 0.0


def test_empty_reference_with_prediction_scores_zero():
    reference = np.zeros((4, 4, 4), dtype=bool)
    prediction = reference.copy()
    prediction[1, 1, 1] = True
    m = binary_metrics(reference, prediction, (1.0, 1.0, 1.0))
    assert m["dice"] == 0.0 and m["iou"] == 0.0 and m["precision"] == 0.0
    assert m["voe"] == 1.0 and m["nsd"] == 0.0  # the predicted surface is near no reference surface
    assert m["specificity"] == pytest.approx(63 / 64)
    for key in ("recall", "rvd", "hd", "hd95", "assd"):
        assert m[key] is None, key


def test_empty_prediction_with_reference_scores_zero():
    reference = np.zeros((4, 4, 4), dtype=bool)
    reference[1, 1, 1] = True
    prediction = np.zeros_like(reference)
    m = binary_metrics(reference, prediction, (1.0, 1.0, 1.0))
    assert m["dice"] == 0.0 and m["iou"] == 0.0 and m["recall"] == 0.0
    assert m["voe"] == 1.0 and m["nsd"] == 0.0 and m["rvd"] == -1.0 and m["specificity"] == 1.0
    for key in ("precision", "hd", "hd95", "assd"):
        assert m[key] is None, key


def test_specificity_is_undefined_when_the_reference_fills_the_image():
    full = np.ones((3, 3, 3), dtype=bool)
    m = binary_metrics(full, full, (1.0, 1.0, 1.0))
    assert m["specificity"] is None and m["tn"] == 0
    assert m["dice"] == 1.0 and m["nsd"] == 1.0 and m["hd"] == 0.0


def test_volumes_in_millilitres():
    # 10x10x10 voxels of 2x1x1 mm = 2000 mm³ = 2 mL; 5x5x5 voxels of 2 mm³ = 250 mm³ = 0.25 mL.
    reference = cube((12, 12, 12), (1, 1, 1), size=10)
    prediction = cube((12, 12, 12), (1, 1, 1), size=5)
    m = binary_metrics(reference, prediction, (2.0, 1.0, 1.0))
    assert m["reference_volume_ml"] == pytest.approx(2.0)
    assert m["predicted_volume_ml"] == pytest.approx(0.25)
    assert m["rvd"] == pytest.approx((0.25 - 2.0) / 2.0)  # signed: too small is negative
    assert binary_metrics(prediction, reference, (2.0, 1.0, 1.0))["rvd"] == pytest.approx(7.0)


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


@pytest.mark.parametrize("tolerance_mm", [-1.0, float("nan"), float("inf")])
def test_bad_tolerance_is_rejected(tolerance_mm):
    mask = cube((9, 9, 9), (1, 1, 1))
    with pytest.raises(ValueError, match="tolerance_mm"):
        binary_metrics(mask, mask, (1.0, 1.0, 1.0), tolerance_mm=tolerance_mm)


def test_a_crop_with_image_voxels_scores_like_the_whole_image():
    reference = cube((12, 12, 12), (1, 2, 3))
    prediction = cube((12, 12, 12), (2, 2, 4), size=4)
    whole = binary_metrics(reference, prediction, (2.0, 1.0, 0.7))
    box = (slice(1, 6), slice(2, 7), slice(3, 8))  # holds every foreground voxel of both
    crop = binary_metrics(reference[box], prediction[box], (2.0, 1.0, 0.7), image_voxels=12**3)
    assert crop == pytest.approx(whole)
    with pytest.raises(ValueError, match="image_voxels"):
        binary_metrics(reference, prediction, (1.0, 1.0, 1.0), image_voxels=10)


def _edt_surface_distances(reference, prediction, spacing_mm):
    """The textbook definition (as MedPy): the EDT of the other surface, read at this mask's boundary voxels."""
    structure = ndimage.generate_binary_structure(3, 1)
    ref_surface = reference ^ ndimage.binary_erosion(reference, structure, border_value=0)
    pred_surface = prediction ^ ndimage.binary_erosion(prediction, structure, border_value=0)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing_mm)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing_mm)
    return to_pred[ref_surface], to_ref[pred_surface]


@pytest.mark.parametrize("spacing_mm", [(1.0, 1.0, 1.0), (5.0, 0.8, 0.8), (0.7, 2.5, 1.3)])
def test_surface_distances_equal_the_distance_transform_of_the_other_surface(spacing_mm):
    # Irregular blobs (smoothed seeded noise) touching the array edge, several components each.
    rng = np.random.default_rng(7)
    noise = ndimage.gaussian_filter(rng.standard_normal((2, 18, 30, 26)), sigma=(0, 2, 3, 3))
    reference, prediction = noise[0] > 0.05, noise[1] > 0.05
    expected = _edt_surface_distances(reference, prediction, spacing_mm)
    for ours, theirs in zip(surface_distances(reference, prediction, spacing_mm), expected):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)


def test_ragged_surfaces_use_distance_transforms_with_the_same_distances(monkeypatch):
    """Speckle (an untrained model's output) has a surface point in most voxels: distances then come from
    distance transforms, and they equal the k-d tree's exactly."""
    from autoseg.evaluation import metrics

    rng = np.random.default_rng(0)
    ref, pred = rng.random((12, 40, 40)) > 0.5, rng.random((12, 40, 40)) > 0.6
    spacing = (1.5, 0.8, 0.8)
    fast = metrics._surface_distances(ref, pred, spacing)
    monkeypatch.setattr(metrics, "EDT_SURFACE_FRACTION", 10**12)  # force the k-d tree
    exact = metrics._surface_distances(ref, pred, spacing)
    assert len(fast[0]) == len(exact[0]) > ref.size // 50
    np.testing.assert_array_equal(fast[0], exact[0])
    np.testing.assert_array_equal(fast[1], exact[1])
