"""Overlap, volume and surface metrics for one binary structure: pure functions on numpy arrays.

Conventions
-----------
* Masks are arrays of equal shape; any nonzero value is foreground. ``spacing_mm[a]`` is the voxel size along
  ``array.shape[a]`` (autoseg's array order, ``(z, y, x)`` for volumes), so distances come out in mm.
* Volumes are in millilitres: ``voxels * prod(spacing_mm) / 1000``.
* For ``hd``, ``hd95``, ``assd`` and ``nsd_voxel`` the surface of a mask is its boundary voxels (``nsd`` uses
  area-weighted surfels instead, below): ``mask XOR binary_erosion(mask)`` with the face-connected
  structuring element (6 neighbours in 3D). Foreground on the edge of the array is boundary, as if the array
  were padded with background.
* The distance from a boundary voxel to the other mask's surface is the Euclidean distance in mm to the
  nearest boundary voxel of the other mask, ``sqrt(sum_a (di_a * spacing_mm[a])**2)`` over the index
  differences ``di``. These are the values that ``scipy.ndimage.distance_transform_edt(~other_surface,
  sampling=spacing_mm)`` takes at the boundary voxels (MedPy's definition); they are found here with a k-d
  tree over the boundary voxels only, because the transform costs time in proportion to the bounding box
  of both masks (seconds per organ at CT resolution) while the surfaces are a small fraction of it.

Metrics (``A`` reference, ``B`` prediction, ``dA``/``dB`` their boundary voxels, ``d(a, dB)`` as above)
-----------------------------------------------------------------------------------------------------
* ``dice = 2TP / (2TP + FP + FN)``, ``iou = TP / (TP + FP + FN)``, ``voe = 1 - iou`` (volume overlap error).
* ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)`` (sensitivity), ``specificity = TN / (TN + FP)``.
* ``rvd = (V_B - V_A) / V_A``, relative volume difference, *signed*: positive when the prediction is too large,
  negative when too small, -1 for an empty prediction; in ``[-1, inf)``. (MedPy's ``ravd`` is the same signed
  ratio despite its name.)
* ``hd``: Hausdorff distance, the largest ``d`` in either direction.
* ``hd95``: the larger of the two directed 95th percentiles (numpy's linear interpolation) over the boundary
  voxels, each counted once; DeepMind's ``compute_robust_hausdorff`` takes the same larger directed percentile
  but over area-weighted surfels. MedPy's ``hd95`` takes the 95th percentile of both directions pooled, which
  lies between the two directed percentiles, so it is never larger than ``hd95`` here.
* ``assd``: average symmetric surface distance, ``(sum d(a, dB) + sum d(b, dA)) / (|dA| + |dB|)``: the mean
  over the boundary voxels of both masks (Heimann et al., IEEE TMI 2009; MedPy's ``assd`` since 0.5). The mean
  of the two directed means differs from it when the surfaces have different sizes.
* ``nsd``: normalised surface Dice at ``tolerance_mm`` (Nikolov et al., JMIR 2021), as DeepMind's
  ``surface-distance`` computes it (``compute_surface_dice_at_tolerance``) and the Medical Segmentation Decathlon
  reports it: the surface is made of surface elements (surfels) weighted by their area, and NSD is the area of
  both surfaces within the tolerance of the other over the area of both,
  ``(sum_{s in SA: d(s, SB) <= tol} area(s) + sum_{s in SB: d(s, SA) <= tol} area(s)) / (area(SA) + area(SB))``.
  The surfels of a mask sit on the corners of its voxel grid (the points between 2x2x2 voxels, half a voxel
  outside each voxel centre) where the eight voxels around the corner are neither all foreground nor all
  background. Each carries the area in mm² of the marching-cubes triangles (classic Lorensen table) that
  separate the minority corners of that 2x2x2 cube from the others, scaled by the spacing (so anisotropic
  spacing changes the areas, not only the distances); a single foreground voxel on a 1 mm grid has 8 surfels of
  ``sqrt(3)/8`` mm² each. ``d(s, SB)`` is the distance in mm from the corner to the nearest surfel corner of the
  other mask (as for the boundary voxels above). In 2D the surfels are contour segments weighted by length.
  Values equal DeepMind's to float precision (``tests/evaluation/test_nsd.py`` checks this on real masks).
* ``nsd_voxel``: the earlier, voxel-count variant (MONAI's ``compute_surface_dice(use_subvoxels=False)``):
  ``(#{a in dA: d(a, dB) <= tol} + #{b in dB: d(b, dA) <= tol}) / (|dA| + |dB|)`` over the boundary voxels,
  each counted once whatever its orientation or spacing. It is *not* a small correction of ``nsd``: a face of
  boundary voxels that lies one voxel outside the other surface counts as entirely missed here, while the
  surfels between them are shared, so on real masks at a one-voxel tolerance it comes out much lower (a spleen
  CT mask dilated by one voxel: 0.22 against 0.54 for ``nsd``). Kept for comparison with tools that count voxels.

Empty masks
-----------
A metric whose definition divides by zero, or needs a surface that does not exist, is *not defined* and is
returned as ``None``: never NaN, and never a made-up 0 or 1. Summaries leave ``None`` out of means and count it.
Where one surface exists and the other does not, no part of it lies within any tolerance of the other: NSD is
0, like Dice, while the distances (``hd``, ``hd95``, ``assd``) would be infinite and are ``None``. With both
masks empty NSD is 0/0 and ``None``, like Dice (DeepMind's code gives NaN there; some challenges score 1).

=====================  =====  =====  =====  =========  ======  ====  ==================  ===============
masks                  dice   iou    voe    precision  recall  rvd   hd, hd95, assd      nsd, nsd_voxel
=====================  =====  =====  =====  =========  ======  ====  ==================  ===============
both empty             None   None   None   None       None    None  None                None
reference empty only   0      0      1      0          None    None  None                0
prediction empty only  0      0      1      None       0       -1    None                0
=====================  =====  =====  =====  =========  ======  ====  ==================  ===============

``specificity`` is ``None`` only where the reference has no background (it fills the image: ``TN + FP = 0``);
with both masks empty it is 1. The confusion counts (``tp``, ``fp``, ``fn``, ``tn``) and both volumes are
always defined.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

MetricValue = float | int | None
"""One metric: ``float`` for ratios, volumes and distances, ``int`` for counts, ``None`` where not defined."""

METRIC_KEYS = (
    "dice",
    "iou",
    "precision",
    "recall",
    "specificity",
    "voe",
    "rvd",
    "hd",
    "hd95",
    "assd",
    "nsd",
    "nsd_voxel",
    "tp",
    "fp",
    "fn",
    "tn",
    "reference_volume_ml",
    "predicted_volume_ml",
)
"""The keys of :func:`binary_metrics`, in this order."""

METRIC_UNITS = {
    **dict.fromkeys(
        ("dice", "iou", "precision", "recall", "specificity", "voe", "rvd", "nsd", "nsd_voxel"), "ratio"
    ),
    **dict.fromkeys(("hd", "hd95", "assd"), "mm"),
    **dict.fromkeys(("tp", "fp", "fn", "tn"), "voxels"),
    **dict.fromkeys(("reference_volume_ml", "predicted_volume_ml"), "mL"),
}

DEFAULT_TOLERANCE_MM = 1.0
"""Default NSD tolerance."""


def confusion(reference: np.ndarray, prediction: np.ndarray) -> tuple[int, int, int, int]:
    """Voxel counts ``(tp, fp, fn, tn)`` of ``prediction`` against ``reference`` (same shape, nonzero = foreground).

    Raises ``ValueError`` if the shapes differ.
    """
    ref, pred = _as_masks(reference, prediction)
    tp = int(np.count_nonzero(ref & pred))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(ref)) - tp
    tn = int(ref.size) - tp - fp - fn
    return tp, fp, fn, tn


def surface_distances(
    reference: np.ndarray, prediction: np.ndarray, spacing_mm: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm between the surfaces (boundary voxels) of two non-empty masks of the same shape.

    Returns ``(reference_to_prediction, prediction_to_reference)``: 1D float arrays with one entry per
    boundary voxel of the first-named mask (in C order of the voxels), the distance to the nearest boundary
    voxel of the other. Raises ``ValueError`` if either mask is empty, the shapes differ or ``spacing_mm``
    does not fit.
    """
    ref, pred = _as_masks(reference, prediction)
    spacing = _check_spacing(spacing_mm, ref.ndim)
    if not ref.any() or not pred.any():
        raise ValueError("surface distances are not defined for an empty mask")
    box = _union_box(ref, pred)
    return _surface_distances(ref[box], pred[box], spacing)


def binary_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing_mm: Sequence[float],
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    *,
    image_voxels: int | None = None,
) -> dict[str, MetricValue]:
    """All metrics of ``prediction`` against ``reference`` for one structure.

    ``reference`` and ``prediction``: 2D or 3D masks of the same shape (nonzero = foreground); ``spacing_mm``:
    one positive voxel size per axis, in array order; ``tolerance_mm``: the NSD tolerance (>= 0). The masks may
    be a crop of a larger image that holds all foreground of both: ``image_voxels`` is then that image's voxel
    count (it only changes ``tn`` and ``specificity``; default: the masks' own size). Cropping changes nothing
    else, since voxels outside the crop are background in both masks, as beyond the array edge.

    Returns plain Python numbers (JSON-ready) under :data:`METRIC_KEYS`: ratios, distances in mm, counts in
    voxels and volumes in mL (see the module docstring for definitions); undefined metrics are ``None`` as
    tabulated there. Raises ``ValueError`` on mismatched shapes, masks that are not 2D or 3D, bad spacing, a
    negative tolerance or an ``image_voxels`` smaller than the masks.
    """
    ref, pred = _as_masks(reference, prediction)
    spacing = _check_spacing(spacing_mm, ref.ndim)
    tolerance = check_tolerance(tolerance_mm)
    if ref.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got {ref.ndim}D")
    if image_voxels is None:
        image_voxels = ref.size
    elif image_voxels < ref.size:
        raise ValueError(f"image_voxels {image_voxels} is smaller than the masks ({ref.size} voxels)")
    box = _union_box(ref, pred)
    if box is not None:  # both empty: nothing to crop to
        ref, pred = ref[box], pred[box]
    tp = int(np.count_nonzero(ref & pred))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(ref)) - tp
    tn = int(image_voxels) - tp - fp - fn
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {
        **_overlap_metrics(tp, fp, fn, tn),
        **_surface_metrics(ref, pred, spacing, tolerance),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "reference_volume_ml": (tp + fn) * voxel_ml,
        "predicted_volume_ml": (tp + fp) * voxel_ml,
    }


def surface_dice(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing_mm: Sequence[float],
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
) -> float | None:
    """The area-weighted normalised surface Dice (``nsd`` of :func:`binary_metrics`) of two 2D or 3D masks.

    ``None`` where both masks are empty, 0 where only one is. Raises ``ValueError`` as :func:`binary_metrics`.
    """
    ref, pred = _as_masks(reference, prediction)
    spacing = _check_spacing(spacing_mm, ref.ndim)
    tolerance = check_tolerance(tolerance_mm)
    if ref.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got {ref.ndim}D")
    box = _union_box(ref, pred)
    if box is None:
        return None
    if not ref.any() or not pred.any():
        return 0.0
    return _area_weighted_nsd(ref[box], pred[box], spacing, tolerance)


def _overlap_metrics(tp: int, fp: int, fn: int, tn: int) -> dict[str, MetricValue]:
    """The ratios of the confusion counts, ``None`` where the denominator is 0."""
    iou = _ratio(tp, tp + fp + fn)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": iou,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "voe": None if iou is None else 1.0 - iou,
        "rvd": _ratio(fp - fn, tp + fn),  # (V_pred - V_ref) / V_ref in voxels: the voxel volume cancels
    }


def _surface_metrics(
    ref: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...], tolerance: float
) -> dict[str, MetricValue]:
    """``hd``, ``hd95``, ``assd``, ``nsd`` and ``nsd_voxel`` of two masks cropped to their union box."""
    ref_present, pred_present = bool(ref.any()), bool(pred.any())
    if not (ref_present and pred_present):
        # one surface and nothing to be near to: NSD 0; both empty: 0/0, not defined
        nsd = 0.0 if ref_present or pred_present else None
        return {"hd": None, "hd95": None, "assd": None, "nsd": nsd, "nsd_voxel": nsd}
    ref_to_pred, pred_to_ref = _surface_distances(ref, pred, spacing)
    both = np.concatenate([ref_to_pred, pred_to_ref])
    return {
        "hd": float(both.max()),
        "hd95": float(max(np.percentile(ref_to_pred, 95), np.percentile(pred_to_ref, 95))),
        "assd": float(both.mean()),
        "nsd": _area_weighted_nsd(ref, pred, spacing, tolerance),
        "nsd_voxel": float(np.count_nonzero(both <= tolerance) / both.size),
    }


def check_tolerance(tolerance_mm: float) -> float:
    """``tolerance_mm`` as a float; raises ``ValueError`` unless it is finite and >= 0."""
    tolerance = float(tolerance_mm)
    if not (np.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm}")
    return tolerance


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator > 0 else None


def _as_masks(reference: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(reference) != 0
    pred = np.asarray(prediction) != 0
    if ref.shape != pred.shape:
        raise ValueError(f"reference shape {ref.shape} differs from prediction shape {pred.shape}")
    return ref, pred


def _check_spacing(spacing_mm: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != ndim:
        raise ValueError(f"spacing_mm {spacing} has {len(spacing)} entries for a {ndim}D mask")
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm {spacing} must be positive and finite")
    return spacing


def _boundary(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _surface_distances(
    ref: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    ref_surface, pred_surface = _boundary(ref), _boundary(pred)
    ref_points = np.argwhere(ref_surface)
    pred_points = np.argwhere(pred_surface)
    if len(ref_points) + len(pred_points) > ref.size // EDT_SURFACE_FRACTION:
        # a ragged surface (e.g. an untrained model's speckle): a k-d tree over tens of millions of points
        # takes many minutes, two distance transforms over the box a few seconds, with the same distances
        to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
        to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
        return to_pred[ref_surface], to_ref[pred_surface]
    return (
        _nearest_or_zero(ref_points, pred_surface[ref_surface], pred_points, spacing),
        _nearest_or_zero(pred_points, ref_surface[pred_surface], ref_points, spacing),
    )


def _nearest_or_zero(
    points: np.ndarray, on_target: np.ndarray, targets: np.ndarray, spacing: tuple[float, ...]
) -> np.ndarray:
    """:func:`_nearest_mm`, searching only for the points not on a target (``on_target``: 0 mm)."""
    distances = np.zeros(len(points))
    if not on_target.all():
        distances[~on_target] = _nearest_mm(points[~on_target], targets, spacing)
    return distances


EDT_SURFACE_FRACTION = 50
"""Above ``box voxels / 50`` surface points, distances come from distance transforms instead of a k-d tree."""


def _nearest_mm(points: np.ndarray, targets: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance in mm from each voxel index in ``points`` (n, ndim) to the nearest one in ``targets``."""
    scale = np.asarray(spacing)
    _, nearest = cKDTree(targets * scale).query(points * scale)
    # From the index differences, as scipy's EDT computes it, so a distance of exactly k voxels along one
    # axis is exactly k * spacing (what the NSD tolerance is compared with), free of coordinate rounding.
    delta_mm = (points - targets[nearest]) * scale
    return np.sqrt(np.sum(delta_mm * delta_mm, axis=1))


def _union_box(ref: np.ndarray, pred: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of ``ref | pred`` as slices, or ``None`` if both are empty.

    Cropping to it changes no boundary: a foreground voxel on a face of the box has its outer neighbour
    outside the box, which is background in both masks (as beyond the array edge).
    """
    union = ref | pred
    box = []
    for axis in range(union.ndim):
        other_axes = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=other_axes))
        if present.size == 0:
            return None
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


# ------------------------------------------------------------------ area-weighted surface (DeepMind's surfels)


def _area_weighted_nsd(
    ref: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...], tolerance: float
) -> float:
    """NSD over the area-weighted surfels of two non-empty masks (cropped to their union box)."""
    ref_border, ref_areas = _surfel_mask_and_areas(ref, spacing)
    pred_border, pred_areas = _surfel_mask_and_areas(pred, spacing)
    if len(ref_areas) + len(pred_areas) > ref_border.size // EDT_SURFEL_FRACTION:
        # very ragged surfaces: distance transforms over the corner grid (the same result)
        to_pred = ndimage.distance_transform_edt(~pred_border, sampling=spacing)
        to_ref = ndimage.distance_transform_edt(~ref_border, sampling=spacing)
        ref_near, pred_near = to_pred[ref_border] <= tolerance, to_ref[pred_border] <= tolerance
    else:
        # a surfel on a surfel of the other surface is 0 mm from it (most of a good segmentation): only the
        # others are searched for
        ref_near, pred_near = pred_border[ref_border], ref_border[pred_border]
        if not (ref_near.all() and pred_near.all()):
            ref_points, pred_points = np.argwhere(ref_border), np.argwhere(pred_border)
            ref_near[~ref_near] = _within_mm(ref_points[~ref_near], pred_points, spacing, tolerance)
            pred_near[~pred_near] = _within_mm(pred_points[~pred_near], ref_points, spacing, tolerance)
    near = float(ref_areas[ref_near].sum() + pred_areas[pred_near].sum())
    return near / float(ref_areas.sum() + pred_areas.sum())


EDT_SURFEL_FRACTION = 4
"""Above ``box voxels / 4`` surfels, NSD uses distance transforms instead of a k-d tree: the tree's queries
stop at the tolerance, so it stays faster up to about that density (measured on a 240x240x155 box)."""


def _corner_codes(mask: np.ndarray) -> np.ndarray:
    """For every corner of the voxel grid (shape + 1 per axis), the bits of the 2**ndim voxels around it.

    Bit ``sum_a o_a * 2**(ndim - 1 - a)`` is set when the voxel at offset ``o`` (0 or 1 per axis, from the
    corner's lower neighbour) is foreground; voxels beyond the array are background.
    """
    padded = np.pad(mask, 1).view(np.uint8)  # a bool mask: 0 or 1 per byte
    codes = np.zeros(tuple(n + 1 for n in mask.shape), dtype=np.uint8)
    for bit, offset in enumerate(np.ndindex((2,) * mask.ndim)):  # C order: bit = offset read in binary
        window = tuple(slice(o, o + n + 1) for o, n in zip(offset, mask.shape))
        codes |= padded[window] << bit
    return codes


def _surfel_mask_and_areas(mask: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The corners that carry surface (a boolean grid of shape + 1) and the area of each, in C order."""
    codes = _corner_codes(mask)
    full = 2 ** (2**mask.ndim) - 1
    border = (codes != 0) & (codes != full)
    return border, _surfel_area_table(spacing)[codes[border]]


def _within_mm(
    points: np.ndarray, targets: np.ndarray, spacing: tuple[float, ...], tolerance: float
) -> np.ndarray:
    """Whether each point (corner index) has a target within ``tolerance`` mm, the distance taken from the
    index differences (as scipy's EDT and :func:`_nearest_mm`), so the comparison with the tolerance is exact."""
    scale = np.asarray(spacing)
    bound = tolerance * (1 + 1e-9) + 1e-12  # the tree's own rounding must not lose a point at the tolerance
    tree = cKDTree(targets * scale, balanced_tree=False)  # midpoint splits: faster to build on a grid
    found, nearest = tree.query(points * scale, distance_upper_bound=bound)
    hit = np.isfinite(found)
    delta_mm = (points[hit] - targets[nearest[hit]]) * scale
    within = np.zeros(len(points), dtype=bool)
    within[hit] = np.sqrt(np.sum(delta_mm * delta_mm, axis=1)) <= tolerance
    return within


@lru_cache(maxsize=64)
def _surfel_area_table(spacing: tuple[float, ...]) -> np.ndarray:
    """Surface area in mm² (3D; contour length in mm in 2D) of each corner code at ``spacing``.

    3D: the marching-cubes triangles of the code's minority corners (the set ones if at most four are set,
    else the unset ones, so a code and its complement get the same area and diagonal neighbours are separate
    pieces), each triangle's unit-grid area vector scaled per axis by the product of the other two spacings.
    2D: one corner cut off gives half the pixel diagonal, two corners along an axis the side across it, two
    diagonal corners two half-diagonals.
    """
    if len(spacing) == 2:
        return _contour_length_table(spacing)
    codes, vectors = _unit_triangles()
    s0, s1, s2 = spacing
    scaled = vectors * np.array([s1 * s2, s0 * s2, s0 * s1])
    return np.bincount(codes, weights=np.linalg.norm(scaled, axis=1), minlength=256)


@lru_cache(maxsize=1)
def _unit_triangles() -> tuple[np.ndarray, np.ndarray]:
    """``(code of each triangle, its area vector on the unit grid)`` over the 254 mixed 2x2x2 codes."""
    from skimage.measure import marching_cubes

    codes, vectors = [], []
    for code in range(1, 255):
        minority = code if bin(code).count("1") <= 4 else 255 - code
        cube = np.zeros((2, 2, 2))
        for bit, offset in enumerate(np.ndindex(2, 2, 2)):  # the bit order of _corner_codes
            cube[offset] = (minority >> bit) & 1
        verts, faces, _, _ = marching_cubes(cube, 0.5, method="lorensen", allow_degenerate=False)
        corners = verts.astype(np.float64)[faces]  # edge midpoints: exact in float32
        area_vectors = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]) / 2
        codes.extend([code] * len(faces))
        vectors.append(area_vectors)
    return np.array(codes), np.concatenate(vectors)


def _contour_length_table(spacing: tuple[float, ...]) -> np.ndarray:
    half_diagonal = 0.5 * float(np.hypot(*spacing))
    table = np.zeros(16)
    for code in range(1, 15):
        minority = code if bin(code).count("1") <= 2 else 15 - code
        corners = [offset for bit, offset in enumerate(np.ndindex(2, 2)) if minority >> bit & 1]
        if len(corners) == 1:
            table[code] = half_diagonal
        elif corners[0][0] == corners[1][0]:  # along axis 1: the contour crosses it, one axis-1 side long
            table[code] = spacing[1]
        elif corners[0][1] == corners[1][1]:
            table[code] = spacing[0]
        else:
            table[code] = 2 * half_diagonal
    return table
