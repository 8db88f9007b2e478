"""Undo preprocessing: probabilities on the resampled grid → label map with the input's exact geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoseg.io.volume import reorient_to, write_volume
from autoseg.planning.plans import Plans
from autoseg.preprocessing.crop import uncrop
from autoseg.preprocessing.pipeline import CaseProperties
from autoseg.preprocessing.resample import resample_channel, resample_probabilities


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
    return _to_file_order(seg, props, plans)


def _to_file_order(seg: np.ndarray, props: CaseProperties, plans: Plans) -> np.ndarray:
    """A label map on the cropped grid (plans' axis order) → the file's own array order and full extent."""
    seg = seg.transpose(plans.transpose_backward)
    seg = uncrop(seg, [tuple(b) for b in props.bbox], props.geometry.shape, fill=0)
    return reorient_to(seg, props.geometry, props.source_geometry)


class SlabSegmenter:
    """:func:`probabilities_to_segmentation` fed slab by slab: memory independent of the number of classes.

    ``add(a, b, slab)`` takes the probabilities of rows ``[a, b)`` of axis 0 of the network's grid, in order
    (as :func:`autoseg.inference.sliding_window.probability_slabs` yields them). Each slab is resampled
    in-plane at once; the output rows along axis 0 are linear blends of two resampled input rows (the
    mapping and edge handling of the whole-volume resampling: voxel edges aligned, edge values repeated), and
    are turned into labels as soon as both rows are in. Only a slab and the label map are ever held. Trilinear
    resampling is separable, so the labels equal the whole-volume export's up to float rounding (a voxel whose
    two best classes are within about 1e-6 may differ).
    """

    def __init__(self, props: CaseProperties, plans: Plans, grid_shape: tuple[int, ...]):
        self.props, self.plans = props, plans
        self.out_shape, _ = _cropped_grid(props, plans)
        n_in, n_out = grid_shape[0], self.out_shape[0]
        c = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        self.i0 = np.floor(c).astype(np.int64)
        self.i1 = np.minimum(self.i0 + 1, n_in - 1)
        self.frac = (c - self.i0).astype(np.float32)
        self.seg = np.zeros(self.out_shape, dtype=np.uint8)
        self.rows: dict[int, np.ndarray] = {}  # input row → (K, Y, X) resampled in-plane
        self.done = 0  # output rows [0, done) are labelled

    def add(self, a: int, b: int, slab: np.ndarray) -> None:
        inplane = (b - a, *self.out_shape[1:])
        resampled = np.stack([_zoom_linear(slab[k], inplane) for k in range(slab.shape[0])], axis=1)
        for r in range(b - a):
            self.rows[a + r] = resampled[r]
        stop = self.done
        while stop < len(self.i1) and self.i1[stop] < b:
            stop += 1
        for o in range(self.done, stop):
            f = self.frac[o]
            p = self.rows[self.i0[o]] * (1 - f) + self.rows[self.i1[o]] * f if f else self.rows[self.i0[o]]
            self.seg[o] = probabilities_to_labels(p, self.plans)
        self.done = stop
        keep_from = self.i0[stop] if stop < len(self.i0) else b
        for r in [r for r in self.rows if r < keep_from]:
            del self.rows[r]

    def result(self) -> np.ndarray:
        """The label map in the file's array order (as :func:`probabilities_to_segmentation`)."""
        if self.done != len(self.i0):
            raise RuntimeError(f"slabs cover {self.done} of {len(self.i0)} output rows")
        return _to_file_order(self.seg, self.props, self.plans)


def _zoom_linear(x: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    """Linear resampling of axes 1.. of ``x`` (axis 0 kept), as the whole-volume export resamples."""
    return resample_channel(x, out_shape, (1.0,) * x.ndim, order=1, order_coarse=1)


def probabilities_to_original(probs: np.ndarray, props: CaseProperties, plans: Plans) -> np.ndarray:
    """``probs`` ``(K, *shape_resampled)`` → float16 ``(K, *file array shape)`` in the file's own orientation
    and grid (what ``--save-probabilities`` and cross-validation ensembling store). Outside the nonzero bounding
    box: background (probability 1 for class 0 of a softmax plan, 0 for every region of a sigmoid plan).
    Channels are resampled one at a time into the preallocated result, so the peak is the result plus about
    two single-channel volumes."""
    out = np.empty((probs.shape[0], *props.source_geometry.shape), dtype=np.float16)
    for k in range(probs.shape[0]):
        fill = 1.0 if (k == 0 and not plans.region_based) else 0.0
        out[k] = map_to_original(probs[k], props, plans, fill)
    return out


def map_to_original(values: np.ndarray, props: CaseProperties, plans: Plans, fill: float = 0.0) -> np.ndarray:
    """One map on the network's grid ``(*shape_resampled)`` → float32 ``(*file array shape)`` in the file's own
    orientation and grid: resampled linearly (as probabilities are), ``fill`` outside the nonzero bounding box."""
    cropped_t, spacing = _cropped_grid(props, plans)
    channel = resample_probabilities(values[None], spacing, cropped_t)[0]
    channel = channel.transpose(plans.transpose_backward).astype(np.float32, copy=False)
    full = uncrop(channel, [tuple(b) for b in props.bbox], props.geometry.shape, fill=fill)
    return reorient_to(full, props.geometry, props.source_geometry)


def write_segmentation(seg: np.ndarray, props: CaseProperties, path: Path) -> Path:
    """Write ``seg`` atomically with the original image's spacing, origin and direction."""
    return write_volume(seg, props.source_geometry, path)
