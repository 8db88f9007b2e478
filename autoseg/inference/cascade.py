"""Cascade plumbing shared by training and inference: a previous stage's prediction as extra input channels.

The previous stage (``3d_lowres``) predicts on its own coarser grid; its class probabilities are resampled
linearly onto the full-resolution preprocessed grid of the same case (both grids cover the same nonzero crop)
and turned into a label map; the cascade network then receives one one-hot channel per foreground class
after the image channels.
"""

from __future__ import annotations

import numpy as np

from autoseg.inference.export import probabilities_to_labels
from autoseg.planning.plans import Plans
from autoseg.preprocessing.resample import resample_probabilities


def next_stage_segmentation(
    probs: np.ndarray, spacing: list[float], out_shape: list[int], plans: Plans
) -> np.ndarray:
    """``probs`` ``(K, *grid)`` of the previous stage → uint8 label map of ``out_shape`` (the next stage's grid).

    ``spacing`` is the previous stage's spacing (it decides the separate treatment of an anisotropic axis).
    """
    probs = resample_probabilities(probs, tuple(spacing), tuple(out_shape))
    return probabilities_to_labels(probs, plans)


def append_previous_stage(image: np.ndarray, previous: np.ndarray, num_classes: int) -> np.ndarray:
    """``image`` ``(C, ...)`` + one-hot of ``previous`` ``(...)`` for classes 1..K-1 → ``(C + K - 1, ...)``."""
    onehot = np.stack([(previous == k).astype(np.float32) for k in range(1, num_classes)])
    return np.concatenate([image.astype(np.float32, copy=False), onehot], axis=0)
