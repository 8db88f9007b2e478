"""Resampling voxel grids to a target spacing (array order, mm).

The grid keeps its physical extent: a shape ``n`` at spacing ``s`` becomes ``round(n * s / t)`` at spacing
``t`` (voxel edges aligned, ``grid_mode=True``). Images use third-order splines. For anisotropic data (one axis
more than 3× coarser than the finest) the coarse axis is resampled separately and linearly, so that the
spline does not ring across thick slices. Label maps are resampled one label at a time as soft masks (linear)
and recombined by argmax (each output voxel takes the label that covers most of it), so the output only
holds values that were in the input and boundaries are smooth rather than staircased.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

ANISOTROPY_RATIO = 3.0


def new_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[int, ...]:
    """Shape of a grid of ``shape`` voxels at ``spacing`` after resampling to ``target`` spacing."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def _coarse_axis(spacing: tuple[float, ...]) -> int | None:
    sp = np.asarray(spacing, dtype=float)
    if sp.max() / sp.min() > ANISOTROPY_RATIO:
        return int(np.argmax(sp))
    return None


def _zoom(x: np.ndarray, out_shape: tuple[int, ...], order: int) -> np.ndarray:
    if tuple(x.shape) == tuple(out_shape):
        return x
    factors = [o / i for o, i in zip(out_shape, x.shape)]
    return ndimage.zoom(x, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)


def resample_channel(
    x: np.ndarray,
    out_shape: tuple[int, ...],
    spacing: tuple[float, ...],
    order: int = 3,
    order_coarse: int = 1,
) -> np.ndarray:
    """Resample one 3D array ``x`` to ``out_shape``; ``spacing`` is the source spacing (decides anisotropy)."""
    out_shape = tuple(int(v) for v in out_shape)
    if tuple(x.shape) == out_shape:
        return x
    x = x.astype(np.float32, copy=False)
    axis = _coarse_axis(spacing)
    if axis is None or x.shape[axis] == out_shape[axis]:
        return _zoom(x, out_shape, order).astype(np.float32, copy=False)
    # in-plane first (coarse axis untouched), then the coarse axis on its own at low order
    inplane = tuple(x.shape[a] if a == axis else out_shape[a] for a in range(x.ndim))
    y = _zoom(x, inplane, order)
    return _zoom(y, out_shape, order_coarse).astype(np.float32, copy=False)


def resample_image(
    image: np.ndarray,
    spacing: tuple[float, ...],
    target: tuple[float, ...],
    out_shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Resample every channel of ``image`` ``(C, Z, Y, X)`` from ``spacing`` to ``target`` (order 3)."""
    out_shape = out_shape or new_shape(image.shape[1:], spacing, target)
    if tuple(image.shape[1:]) == tuple(out_shape):
        return image.astype(np.float32, copy=False)
    return np.stack([resample_channel(image[c], out_shape, spacing) for c in range(image.shape[0])])


def resample_label(
    label: np.ndarray,
    spacing: tuple[float, ...],
    target: tuple[float, ...],
    out_shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Resample a label map ``(Z, Y, X)``; output values are a subset of the input's values."""
    out_shape = out_shape or new_shape(label.shape, spacing, target)
    if tuple(label.shape) == tuple(out_shape):
        return label
    values = np.unique(label)
    if len(values) == 1:
        return np.full(out_shape, values[0], dtype=label.dtype)
    best = np.full(out_shape, -1.0, dtype=np.float32)
    out = np.zeros(out_shape, dtype=label.dtype)
    for v in values:
        soft = resample_channel((label == v).astype(np.float32), out_shape, spacing, order=1, order_coarse=1)
        better = soft > best
        out[better] = v
        best[better] = soft[better]
    return out


def resample_probabilities(
    probs: np.ndarray, spacing: tuple[float, ...], out_shape: tuple[int, ...]
) -> np.ndarray:
    """Resample class probabilities / logits ``(K, Z, Y, X)`` to ``out_shape`` linearly (for export)."""
    if tuple(probs.shape[1:]) == tuple(out_shape):
        return probs
    return np.stack(
        [
            resample_channel(probs[k], out_shape, spacing, order=1, order_coarse=1)
            for k in range(probs.shape[0])
        ]
    )
