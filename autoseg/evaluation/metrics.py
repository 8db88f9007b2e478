"""Overlap and surface metrics for one binary structure: pure functions on numpy arrays.

Conventions
-----------
* Masks are arrays of equal shape; any nonzero value is foreground. ``spacing_mm[a]`` is the voxel size along
  ``array.shape[a]`` (autoseg's array order, ``(z, y, x)`` for volumes), so distances come out in mm.
* Volumes are in millilitres: ``voxels * prod(spacing_mm) / 1000``.
* The surface of a mask is its boundary voxels, ``mask XOR binary_erosion(mask)`` with the face-connected
  structuring element (6 neighbours in 3D). Foreground on the edge of the array is boundary, as if the array
  were padded with background.
* Surface distances are measured from each boundary voxel of one mask to the nearest boundary voxel of the
  other (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing_mm``), in both directions.
  ``hd95_mm`` is the larger of the two directed 95th percentiles (numpy's linear interpolation);
  ``assd_mm`` is the mean of the two directed mean distances.

Empty masks
-----------
A metric whose definition divides by zero, or needs a surface that does not exist, is *not defined* and is
returned as ``None``: never NaN, and never a made-up 0 or 1. Summaries leave ``None`` out of means and count it.

========================  =====  =====  =========  ======  =================
masks                     dice   iou    precision  recall  hd95_mm, assd_mm
========================  =====  =====  =========  ======  =================
both empty                None   None   None       None    None
reference empty only      0      0      0          None    None
prediction empty only     0      0      None       0       None
========================  =====  =====  =========  ======  =================

The confusion counts (``tp``, ``fp``, ``fn``, ``tn``) and both volumes are always defined.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

MetricValue = float | int | None
"""One metric: ``float`` for ratios, volumes and distances, ``int`` for counts, ``None`` where not defined."""


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
    boundary voxel of the first-named mask, the distance to the nearest boundary voxel of the other.
    Raises ``ValueError`` if either mask is empty, the shapes differ or ``spacing_mm`` does not fit.
    """
    ref, pred = _as_masks(reference, prediction)
    spacing = _check_spacing(spacing_mm, ref.ndim)
    if not ref.any() or not pred.any():
        raise ValueError("surface distances are not defined for an empty mask")
    ref, pred = _crop_to_union(ref, pred)
    ref_surface = _boundary(ref)
    pred_surface = _boundary(pred)
    # The EDT gives each voxel its distance to the nearest zero, so the surface voxels are the zeros.
    to_ref_mm = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
    to_pred_mm = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return to_pred_mm[ref_surface], to_ref_mm[pred_surface]


def binary_metrics(
    reference: np.ndarray, prediction: np.ndarray, spacing_mm: Sequence[float]
) -> dict[str, MetricValue]:
    """All metrics of ``prediction`` against ``reference`` for one structure.

    ``reference`` and ``prediction``: masks of the same shape (nonzero = foreground); ``spacing_mm``: one
    positive voxel size per axis, in array order. Returns plain Python numbers (JSON-ready) under the keys
    ``dice, iou, precision, recall`` (ratios in [0, 1]), ``tp, fp, fn, tn`` (voxel counts),
    ``reference_volume_ml, predicted_volume_ml`` and ``hd95_mm, assd_mm``. Undefined metrics are ``None``
    as tabulated in the module docstring. Raises ``ValueError`` on mismatched shapes or bad spacing.
    """
    ref, pred = _as_masks(reference, prediction)
    spacing = _check_spacing(spacing_mm, ref.ndim)
    tp, fp, fn, tn = confusion(ref, pred)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    hd95_mm: float | None = None
    assd_mm: float | None = None
    if tp + fn > 0 and tp + fp > 0:
        ref_to_pred, pred_to_ref = surface_distances(ref, pred, spacing)
        hd95_mm = float(max(np.percentile(ref_to_pred, 95), np.percentile(pred_to_ref, 95)))
        assd_mm = float((ref_to_pred.mean() + pred_to_ref.mean()) / 2)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "reference_volume_ml": (tp + fn) * voxel_ml,
        "predicted_volume_ml": (tp + fp) * voxel_ml,
        "hd95_mm": hd95_mm,
        "assd_mm": assd_mm,
    }


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


def _crop_to_union(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one voxel (kept inside the array).

    Only for speed: every boundary voxel and every neighbour the erosion looks at lies in the box, and
    voxels outside the box count as background exactly as the array edge does, so the distances are unchanged.
    """
    union = ref | pred
    box = []
    for axis in range(union.ndim):
        other_axes = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=other_axes))
        box.append(slice(max(int(present[0]) - 1, 0), min(int(present[-1]) + 2, union.shape[axis])))
    return ref[tuple(box)], pred[tuple(box)]
