"""Undo preprocessing: probabilities on the resampled grid → label map with the input's exact geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoseg.io.volume import reorient_to, write_volume
from autoseg.planning.plans import Plans
from autoseg.preprocessing.crop import uncrop
from autoseg.preprocessing.pipeline import CaseProperties
from autoseg.preprocessing.resample import resample_probabilities


def probabilities_to_labels(probs: np.ndarray, plans: Plans) -> np.ndarray:
    """``(K, ...)`` probabilities → uint8 label map: argmax over classes, or for region-based plans each
    region with probability > 0.5 painted in turn with its value from ``regions_class_order`` (later regions,
    usually nested inside earlier ones, overwrite)."""
    if not plans.region_based:
        return np.argmax(probs, axis=0).astype(np.uint8)
    seg = np.zeros(probs.shape[1:], dtype=np.uint8)
    for channel, value in enumerate(plans.regions_class_order):
        seg[probs[channel] > 0.5] = value
    return seg


def _cropped_grid(props: CaseProperties, plans: Plans) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape and spacing of the nonzero crop in the plans' transposed axis order (where export resamples to)."""
    cropped = [b - a for a, b in props.bbox]
    return tuple(cropped[a] for a in plans.transpose_forward), tuple(props.spacing_transposed)


def probabilities_to_segmentation(probs: np.ndarray, props: CaseProperties, plans: Plans) -> np.ndarray:
    """``probs`` ``(K, *shape_resampled)`` → uint8 label map in the array order of the file as stored.

    Probabilities are resampled linearly to the cropped grid (coarse axis separately, as in preprocessing) one
    channel at a time, keeping a running argmax (or, for regions, painting each in turn), so memory stays at a
    few volumes whatever the number of classes; the result is transposed back, placed into the nonzero bounding
    box (outside it is background), and turned back from the plans' orientation to the file's own.
    """
    bbox = props.bbox
    cropped_t, spacing = _cropped_grid(props, plans)
    if plans.region_based:
        seg = np.zeros(cropped_t, dtype=np.uint8)
        for channel, value in enumerate(plans.regions_class_order):
            seg[resample_probabilities(probs[channel : channel + 1], spacing, cropped_t)[0] > 0.5] = value
    else:
        # a copy: without resampling this is a view of ``probs``, which the running max must not overwrite
        best = np.array(resample_probabilities(probs[:1], spacing, cropped_t)[0], dtype=np.float32)
        seg = np.zeros(cropped_t, dtype=np.uint8)
        for k in range(1, probs.shape[0]):
            p = resample_probabilities(probs[k : k + 1], spacing, cropped_t)[0]
            better = p > best  # strict: ties go to the lower class, as np.argmax
            seg[better] = k
            np.maximum(best, p, out=best)
        del best
    seg = seg.transpose(plans.transpose_backward)
    seg = uncrop(seg, [tuple(b) for b in bbox], props.geometry.shape, fill=0)
    return reorient_to(seg, props.geometry, props.source_geometry)


def probabilities_to_original(probs: np.ndarray, props: CaseProperties, plans: Plans) -> np.ndarray:
    """``probs`` ``(K, *shape_resampled)`` → float16 ``(K, *file array shape)`` in the file's own orientation
    and grid (what ``--save-probabilities`` and cross-validation ensembling store). Outside the nonzero bounding
    box: background (probability 1 for class 0 of a softmax plan, 0 for every region of a sigmoid plan).
    Channels are resampled one at a time into the preallocated result, so the peak is the result plus about
    two single-channel volumes."""
    bbox = props.bbox
    cropped_t, spacing = _cropped_grid(props, plans)
    out = np.empty((probs.shape[0], *props.source_geometry.shape), dtype=np.float16)
    for k in range(probs.shape[0]):
        channel = resample_probabilities(probs[k : k + 1], spacing, cropped_t)[0]
        channel = channel.transpose(plans.transpose_backward).astype(np.float32, copy=False)
        fill = 1.0 if (k == 0 and not plans.region_based) else 0.0
        full = uncrop(channel, [tuple(b) for b in bbox], props.geometry.shape, fill=fill)
        out[k] = reorient_to(full, props.geometry, props.source_geometry)
    return out


def write_segmentation(seg: np.ndarray, props: CaseProperties, path: Path) -> Path:
    """Write ``seg`` atomically with the original image's spacing, origin and direction."""
    return write_volume(seg, props.source_geometry, path)
