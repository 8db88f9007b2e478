"""The area-weighted normalised surface Dice (``nsd``) worked out by hand, and checked against DeepMind's
``surface-distance`` (test-only extra) on real masks.

A mask's surfels sit on the corners of its voxel grid, between 2x2x2 voxels (corner ``j`` along an axis lies
between voxels ``j - 1`` and ``j``). For an axis-aligned box of voxels the surfels are the corners on the
box's outer layer, and their areas (mm², spacing ``s = (s0, s1, s2)``) are those of the marching-cubes pieces:

* a corner inside a face normal to axis ``a``: a unit square across the other two axes, ``F_a = s_b * s_c``;
* a corner on an edge along axis ``a``: a rectangle ``s_a`` long and half the diagonal of the other two axes
  wide, ``E_a = s_a * hypot(s_b, s_c) / 2`` (the box's edges are chamfered);
* a box vertex: the triangle through the three half-edge points, ``V = sqrt((s1 s2)² + (s0 s2)² + (s0 s1)²) / 8``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from autoseg.evaluation import metrics
from autoseg.evaluation.metrics import binary_metrics, surface_dice
from autoseg.io.volume import read_volume
from tests.conftest import real_dataset


def box(shape: tuple[int, ...], start: tuple[int, ...], size: int = 5) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def shifted_cube_surfels(s: tuple[float, float, float]) -> list[tuple[float, float]]:
    """``(area, distance to the other surface)`` of every surfel of a 5x5x5 cube whose copy is one voxel
    further along axis 0. The copy's surfels cover the corner layers 0.5 .. 5.5 along axis 0 (the cube's:
    -0.5 .. 4.5), so by layer of the cube:

    * near face (layer -0.5): 16 face, 8 + 8 edge and 4 vertex surfels, all ``s0`` below the copy's face;
    * side walls (layers 0.5 .. 3.5, four layers of 8 + 8 face and 4 vertical-edge surfels): on the copy's
      side walls, 0 mm;
    * far rim (layer 4.5: 8 + 8 edge and 4 vertex surfels): on the copy's side walls, 0 mm;
    * far face inside the rim (layer 4.5, 4x4 face surfels): inside the copy, ``s0`` below its far face or
      ``k1 * s1`` / ``k2 * s2`` from its side walls, ``k`` = 1 for the outer ring and 2 for the centre.
    """
    s0, s1, s2 = s
    face = (s1 * s2, s0 * s2, s0 * s1)
    edge = (s0 * math.hypot(s1, s2) / 2, s1 * math.hypot(s0, s2) / 2, s2 * math.hypot(s0, s1) / 2)
    vertex = math.sqrt((s1 * s2) ** 2 + (s0 * s2) ** 2 + (s0 * s1) ** 2) / 8
    near = [(face[0], s0)] * 16 + [(edge[1], s0)] * 8 + [(edge[2], s0)] * 8 + [(vertex, s0)] * 4
    walls = ([(face[1], 0.0)] * 8 + [(face[2], 0.0)] * 8 + [(edge[0], 0.0)] * 4) * 4
    rim = [(edge[1], 0.0)] * 8 + [(edge[2], 0.0)] * 8 + [(vertex, 0.0)] * 4
    inner = [(face[0], min(s0, k1 * s1, k2 * s2)) for k1 in (1, 2, 2, 1) for k2 in (1, 2, 2, 1)]
    return near + walls + rim + inner


def expected_nsd(surfels: list[tuple[float, float]], tolerance_mm: float) -> float:
    """Both surfaces are mirror images, so the NSD is the cube's own fraction of area within the tolerance."""
    return sum(a for a, d in surfels if d <= tolerance_mm) / sum(a for a, _ in surfels)


@pytest.mark.parametrize("spacing_mm", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5), (0.8, 0.8, 5.0)])
def test_a_cube_against_itself_is_one(spacing_mm):
    cube = box((9, 9, 9), (2, 1, 3))
    assert surface_dice(cube, cube, spacing_mm, 0.0) == 1.0
    assert binary_metrics(cube, cube, spacing_mm, tolerance_mm=0.0)["nsd"] == 1.0


def test_a_cube_shifted_by_one_voxel_isotropic_worked_out():
    # 1 mm voxels: faces 1 mm², edges sqrt(2)/2, vertices sqrt(3)/8; 96 + 24 sqrt(2) + sqrt(3) mm² per cube.
    # At 0 mm only the side walls (4 layers of 16 + 4 sqrt(2)/2) and the far rim (8 sqrt(2) + sqrt(3)/2) count.
    reference, prediction = box((10, 10, 10), (2, 2, 2)), box((10, 10, 10), (3, 2, 2))
    total = 96 + 24 * math.sqrt(2) + math.sqrt(3)
    at_zero = (64 + 16 * math.sqrt(2) + math.sqrt(3) / 2) / total
    assert surface_dice(reference, prediction, (1.0, 1.0, 1.0), 0.0) == pytest.approx(at_zero, rel=1e-12)
    assert at_zero == pytest.approx(0.6645, abs=1e-4)
    assert surface_dice(reference, prediction, (1.0, 1.0, 1.0), 0.99) == pytest.approx(at_zero, rel=1e-12)
    assert surface_dice(reference, prediction, (1.0, 1.0, 1.0), 1.0) == 1.0  # every surfel 0 or 1 mm away
    # the voxel-count variant: 64 of each cube's 98 boundary voxels at 0 mm
    assert binary_metrics(reference, prediction, (1.0, 1.0, 1.0), 0.0)["nsd_voxel"] == pytest.approx(64 / 98)


@pytest.mark.parametrize("spacing_mm", [(1.0, 1.0, 1.0), (3.0, 1.0, 1.0), (1.0, 2.0, 0.5), (0.8, 0.8, 5.0)])
@pytest.mark.parametrize("tolerance_mm", [0.0, 0.5, 0.8, 1.0, 1.6, 2.0, 3.0])
def test_a_cube_shifted_by_one_voxel_by_surfel_area(spacing_mm, tolerance_mm):
    reference, prediction = box((10, 10, 10), (2, 2, 2)), box((10, 10, 10), (3, 2, 2))
    expected = expected_nsd(shifted_cube_surfels(spacing_mm), tolerance_mm)
    assert surface_dice(reference, prediction, spacing_mm, tolerance_mm) == pytest.approx(expected, rel=1e-12)
    # the shift is symmetric: swapping reference and prediction changes nothing
    assert surface_dice(prediction, reference, spacing_mm, tolerance_mm) == pytest.approx(expected, rel=1e-12)


def test_anisotropic_spacing_changes_the_face_areas():
    # Same masks, same tolerance (0 mm: the distances are 0 or not, whatever the spacing), different spacing:
    # 3 mm slices triple the side walls' area (on the other surface) but not the near face's (missed), so NSD
    # rises; the voxel count cannot see it.
    reference, prediction = box((10, 10, 10), (2, 2, 2)), box((10, 10, 10), (3, 2, 2))
    iso = binary_metrics(reference, prediction, (1.0, 1.0, 1.0), 0.0)
    thick = binary_metrics(reference, prediction, (3.0, 1.0, 1.0), 0.0)
    cube_area = 32 + 16 * math.sqrt(10) + math.sqrt(19) + 192 + 24 * math.sqrt(2)  # 312.9 mm²
    on_walls_and_rim = 192 + 24 * math.sqrt(2) + 8 * math.sqrt(10) + math.sqrt(19) / 2
    assert thick["nsd"] == pytest.approx(on_walls_and_rim / cube_area, rel=1e-12)  # 0.810
    assert iso["nsd"] == pytest.approx(0.6645, abs=1e-4)
    assert iso["nsd_voxel"] == thick["nsd_voxel"] == pytest.approx(64 / 98)


def test_a_square_in_2d_weighs_contour_length():
    # 5x5 pixels one pixel further along axis 0: sides s1 (near and far face), s0 (walls), corners half the
    # pixel diagonal h. Near side (4 s1 + 2 h) is s0 away; walls (8 s0) and far corners (2 h) are on the copy;
    # the far side's 4 inner segments are min(s0, k s1) away, k = 1, 2, 2, 1.
    s0, s1 = 2.0, 0.5
    h = math.hypot(s0, s1) / 2
    total = 8 * s1 + 4 * h + 8 * s0
    square, shifted = box((9, 9), (2, 2)), box((9, 9), (3, 2))
    assert surface_dice(square, shifted, (s0, s1), 0.0) == pytest.approx((8 * s0 + 2 * h) / total, rel=1e-12)
    assert surface_dice(square, shifted, (s0, s1), 1.0) == pytest.approx((8 * s0 + 2 * h + 4 * s1) / total)
    assert surface_dice(square, shifted, (s0, s1), 2.0) == 1.0
    assert surface_dice(square, square, (1.0, 1.0), 0.0) == 1.0


def test_empty_masks():
    cube = box((6, 6, 6), (1, 1, 1), size=2)
    empty = np.zeros_like(cube)
    assert surface_dice(empty, empty, (1.0, 1.0, 1.0)) is None
    assert surface_dice(cube, empty, (1.0, 1.0, 1.0)) == 0.0
    assert surface_dice(empty, cube, (1.0, 1.0, 1.0)) == 0.0
    with pytest.raises(ValueError, match="2D or 3D"):
        surface_dice(np.ones((2, 2, 2, 2)), np.ones((2, 2, 2, 2)), (1.0,) * 4)


def test_distance_transforms_give_what_the_tree_gives(monkeypatch):
    # very ragged surfaces go through distance transforms of the corner grid instead of the k-d tree
    rng = np.random.default_rng(3)
    reference = ndimage.binary_dilation(rng.random((20, 24, 22)) < 0.02)
    prediction = np.roll(reference, 1, axis=1) ^ (rng.random(reference.shape) < 0.01)
    spacing = (2.5, 0.9, 0.9)
    by_tree = [surface_dice(reference, prediction, spacing, t) for t in (0.0, 0.9, 2.0, 3.0)]
    monkeypatch.setattr(metrics, "EDT_SURFEL_FRACTION", 10**12)  # every surface counts as ragged
    by_edt = [surface_dice(reference, prediction, spacing, t) for t in (0.0, 0.9, 2.0, 3.0)]
    assert by_edt == pytest.approx(by_tree, rel=1e-12)
    assert len(set(by_tree)) == 4  # the tolerances matter here


# ------------------------------------------------------------------------------ against DeepMind's package


def _deepmind():
    return pytest.importorskip(
        "surface_distance",
        reason="DeepMind's surface-distance is not installed (test-only extra: pip install -e '.[dev]')",
    )


def _deepmind_nsd(sd, reference, prediction, spacing, tolerance_mm) -> float:
    with warnings.catch_warnings():  # it calls scipy.ndimage.filters / .morphology, deprecated names
        warnings.simplefilter("ignore", DeprecationWarning)
        distances = sd.compute_surface_distances(reference, prediction, spacing)
    return float(sd.compute_surface_dice_at_tolerance(distances, tolerance_mm))


def _mask(path) -> tuple[np.ndarray, tuple[float, ...]]:
    volume = read_volume(path, dtype=None)
    return np.rint(volume.array) > 0, tuple(float(s) for s in volume.spacing_mm)


def _real_pairs():
    ball = ndimage.generate_binary_structure(3, 1)
    spleen, spleen_spacing = _mask(real_dataset("fixtures") / "msd_spleen2_crop" / "label_spleen.nii.gz")
    cord, cord_spacing = _mask(
        real_dataset("Dataset003_SpinalCordTiny") / "labelsTr" / "sct_errsm30_t2w.nii.gz"
    )
    t2star = real_dataset("fixtures") / "sct_t2star_anisotropic"
    grey, t2star_spacing = _mask(t2star / "label_graymatter_manual.nii.gz")
    whole, _ = _mask(t2star / "label_spinalcord.nii.gz")
    opened = ndimage.binary_opening(spleen, ndimage.iterate_structure(ball, 3))
    return [
        ("spleen dilated", spleen, ndimage.binary_dilation(spleen, ball), spleen_spacing),
        ("spleen opened+shifted", spleen, np.roll(opened, (1, 3, -2), axis=(0, 1, 2)), spleen_spacing),
        ("cord eroded+shifted", cord, np.roll(ndimage.binary_erosion(cord, ball), 1, axis=2), cord_spacing),
        ("t2star grey matter vs cord", grey, whole, t2star_spacing),
    ]


@pytest.mark.realdata
def test_nsd_equals_deepminds_surface_dice_on_real_masks():
    sd = _deepmind()
    for name, reference, prediction, spacing in _real_pairs():
        for tolerance_mm in (0.0, min(spacing), 1.0, 2.0, 5.0):
            theirs = _deepmind_nsd(sd, reference, prediction, spacing, tolerance_mm)
            ours = binary_metrics(reference, prediction, spacing, tolerance_mm=tolerance_mm)["nsd"]
            assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-12), (name, tolerance_mm)
        # a slice through the middle, as a 2D mask (contour lengths instead of areas)
        z = int(np.argmax(reference.sum(axis=(1, 2))))
        theirs_2d = _deepmind_nsd(sd, reference[z], prediction[z], spacing[1:], 1.0)
        assert surface_dice(reference[z], prediction[z], spacing[1:], 1.0) == pytest.approx(
            theirs_2d, rel=1e-12
        )


@pytest.mark.realdata
def test_the_spleen_dilated_by_one_voxel_differs_by_definition():
    # issue 18: a spleen CT mask (5 x 0.79 x 0.79 mm) dilated by one voxel, at a one-voxel (in-plane) tolerance
    spleen, spacing = _mask(real_dataset("fixtures") / "msd_spleen2_crop" / "label_spleen.nii.gz")
    dilated = ndimage.binary_dilation(spleen, ndimage.generate_binary_structure(3, 1))
    m = binary_metrics(spleen, dilated, spacing, tolerance_mm=min(spacing))
    assert m["nsd"] == pytest.approx(0.544, abs=1e-3)
    assert m["nsd_voxel"] == pytest.approx(0.223, abs=1e-3)
