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

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChannelNormalization:
    scheme: str  # "zscore" | "ct" | "none"
    use_mask: bool = False
    clip_low: float | None = None
    clip_high: float | None = None
    mean: float | None = None
    std: float | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, d: dict) -> ChannelNormalization:
        return cls(**d)


def normalize_channel(
    x: np.ndarray, norm: ChannelNormalization, mask: np.ndarray | None = None
) -> np.ndarray:
    """Return a float32 normalized copy of one channel ``x`` ``(Z, Y, X)``."""
    x = x.astype(np.float32, copy=True)
    if norm.scheme == "none":
        return x
    if norm.scheme == "ct":
        np.clip(x, norm.clip_low, norm.clip_high, out=x)
        x -= norm.mean
        x /= max(norm.std, 1e-8)
        return x
    if norm.scheme == "zscore":
        if norm.use_mask and mask is not None and mask.any():
            vals = x[mask]
            mean, std = float(vals.mean()), float(vals.std())
            x = (x - mean) / max(std, 1e-8)
            x[~mask] = 0
            return x
        mean, std = float(x.mean()), float(x.std())
        x -= mean
        x /= max(std, 1e-8)
        return x
    raise ValueError(f"unknown normalization scheme {norm.scheme!r}")


def normalize(image: np.ndarray, norms: list[ChannelNormalization], mask: np.ndarray | None) -> np.ndarray:
    """Normalize every channel of ``image`` ``(C, Z, Y, X)``."""
    if len(norms) != image.shape[0]:
        raise ValueError(f"{image.shape[0]} channels but {len(norms)} normalization schemes")
    return np.stack([normalize_channel(image[c], norms[c], mask) for c in range(image.shape[0])])
