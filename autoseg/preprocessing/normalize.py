"""Intensity normalization per channel, as chosen by the planner.

Schemes
-------
``zscore``  per image: ``(x - mean) / std`` over the image (or over the nonzero mask when the plan says
            ``use_mask``; voxels outside the mask are then set to 0).
``ct``      dataset-wide: clip to the foreground 0.5/99.5 percentiles of the training set, then z-score with
            the foreground mean/std of the training set (values stored in the plan).
``none``    leave intensities as they are (cast to float32).
"""

from __future__ import annotations

import numpy as np

from autoseg.planning.plans import ChannelNormalization


def normalize_channel(
    x: np.ndarray, norm: ChannelNormalization, mask: np.ndarray | None = None
) -> np.ndarray:
    """Return a float32 normalized copy of one channel ``x`` ``(Z, Y, X)``.

    Statistics and arithmetic are float64 (a slice at a time), so any finite float32 input gives finite
    output: float32 sums and squares of intensities near 1e36 overflow to Inf, which made NaN images."""
    if norm.scheme == "none":
        return x.astype(np.float32, copy=True)
    if norm.scheme == "ct":
        low, high = float(norm.clip_low), float(norm.clip_high)
        return _affine(x, float(norm.mean), max(float(norm.std), 1e-8), low, high)
    if norm.scheme == "zscore":
        if norm.use_mask and mask is not None and mask.any():
            vals = x[mask]
            mean, std = _mean_std(vals)
            out = _affine(x, mean, max(std, 1e-8))
            out[~mask] = 0
            return out
        mean, std = _mean_std(x)
        return _affine(x, mean, max(std, 1e-8))
    raise ValueError(f"unknown normalization scheme {norm.scheme!r}")


def _mean_std(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation in float64 (two passes, no float64 copy of ``x``)."""
    mean = float(np.mean(x, dtype=np.float64))
    var = 0.0
    flat = x.reshape(-1)
    step = 1 << 22
    for i in range(0, flat.size, step):
        d = flat[i : i + step].astype(np.float64) - mean
        var += float(np.dot(d, d))
    return mean, (var / max(flat.size, 1)) ** 0.5


def _affine(
    x: np.ndarray, mean: float, std: float, low: float | None = None, high: float | None = None
) -> np.ndarray:
    """``(clip(x, low, high) - mean) / std`` as float32, computed in float64 one slice at a time."""
    out = np.empty(x.shape, dtype=np.float32)
    for i in range(x.shape[0]):
        s = x[i].astype(np.float64)
        if low is not None:
            np.clip(s, low, high, out=s)
        s -= mean
        s /= std
        out[i] = s
    return out


def normalize(image: np.ndarray, norms: list[ChannelNormalization], mask: np.ndarray | None) -> np.ndarray:
    """Normalize every channel of ``image`` ``(C, Z, Y, X)``."""
    if len(norms) != image.shape[0]:
        raise ValueError(f"{image.shape[0]} channels but {len(norms)} normalization schemes")
    return np.stack([normalize_channel(image[c], norms[c], mask) for c in range(image.shape[0])])


def background_values(
    image: np.ndarray, mask: np.ndarray, norms: list[ChannelNormalization]
) -> list[float] | None:
    """Per channel, the normalised value of "no image content" in ``image`` ``(C, Z, Y, X)`` (normalised,
    cropped to the nonzero box, ``mask`` its nonzero mask), or None when it cannot be told.

    Where the crop leaves voxels outside the nonzero mask (every channel was 0 there), their normalised value
    (one per channel: normalisation is voxel-wise). Else, for per-image schemes (``zscore``, ``none``), the
    channel's minimum: images whose background was stored as a constant other than 0 (BraTS: the z-score of
    a zero) have it as their minimum. A CT channel has no such rule (air, lungs and bone clip to the same
    bounds): None. An inference tile holding only these values has no image content (see
    :mod:`autoseg.inference.sliding_window`)."""
    outside = ~mask
    if outside.any():
        first = np.unravel_index(int(np.argmax(outside)), outside.shape)  # the first voxel outside
        return [float(image[(c, *first)]) for c in range(image.shape[0])]
    if any(n.scheme == "ct" for n in norms):
        return None
    return [float(image[c].min()) for c in range(image.shape[0])]
