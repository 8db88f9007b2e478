"""Network topology rules: how often to pool each axis, kernel sizes, features per stage, patch rounding.

Pure functions; all sizes in voxels and spacings in mm, in the same (transposed) axis order.
"""

from __future__ import annotations

import math

MIN_FEATURE_MAP = 4  # an axis is pooled only while its feature map stays >= this after pooling
SPACING_RATIO = 2.0  # an axis is pooled / gets a 3-wide kernel only while within 2x of the finest spacing
BASE_FEATURES = 32
MAX_FEATURES = {2: 512, 3: 320}
MAX_STAGES = {2: 7, 3: 6}


def pooling_and_kernels(
    patch_size: list[int], spacing: list[float], max_stages: int | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """Strides and kernel sizes per stage for ``patch_size`` at ``spacing``.

    Stage 0 has stride 1. At each further stage, the axes whose feature map would still be >=
    ``MIN_FEATURE_MAP`` voxels after halving are candidates; among them, those whose current spacing is within
    ``SPACING_RATIO`` of the finest candidate's spacing are halved (an axis too short to pool does not hold the
    others back). Stages stop when no axis can be pooled or ``max_stages`` is reached. Kernels are 1 along an
    axis while it is still more than ``SPACING_RATIO`` coarser than the finest axis (a 3-wide kernel would mix
    distant slices) and 3 from the stage where in-plane pooling has caught up, for good.
    """
    dim = len(patch_size)
    max_stages = max_stages or MAX_STAGES[dim]
    size = [int(s) for s in patch_size]
    sp = [float(s) for s in spacing]
    kern = [1] * dim

    def update_kernel(current: list[float]) -> list[int]:
        finest = min(current)
        for a in range(dim):
            if kern[a] == 1 and current[a] <= SPACING_RATIO * finest:
                kern[a] = 3
        return list(kern)

    strides = [[1] * dim]
    kernels = [update_kernel(sp)]
    while len(strides) < max_stages:
        candidates = [a for a in range(dim) if size[a] // 2 >= MIN_FEATURE_MAP]
        if not candidates:
            break
        finest = min(sp[a] for a in candidates)
        stride = [2 if a in candidates and sp[a] <= SPACING_RATIO * finest else 1 for a in range(dim)]
        size = [n // s for n, s in zip(size, stride)]
        sp = [v * s for v, s in zip(sp, stride)]
        strides.append(stride)
        kernels.append(update_kernel(sp))
    return strides, kernels


def ensure_poolable(patch_size: list[int], spacing: list[float]) -> list[int]:
    """``patch_size`` grown so that the network can pool at least once (a U-Net of one stage has no decoder).

    When no axis reaches ``2 * MIN_FEATURE_MAP`` voxels (volumes of a few voxels, e.g. 3x3x3), the axes
    within ``SPACING_RATIO`` of the finest spacing grow to that size; images smaller than the patch are
    zero-padded by the training sampler and the sliding window, as a single small case always was."""
    need = 2 * MIN_FEATURE_MAP
    if any(p >= need for p in patch_size):
        return [int(p) for p in patch_size]
    finest = min(spacing)
    return [max(int(p), need) if s <= SPACING_RATIO * finest else int(p) for p, s in zip(patch_size, spacing)]


def features_per_stage(n_stages: int, dim: int, base: int = BASE_FEATURES) -> list[int]:
    """``base * 2**stage``, capped at 320 (3D) or 512 (2D)."""
    return [min(base * 2**s, MAX_FEATURES[dim]) for s in range(n_stages)]


def total_stride(strides: list[list[int]]) -> list[int]:
    out = [1] * len(strides[0])
    for s in strides:
        out = [a * b for a, b in zip(out, s)]
    return out


def round_up_to_stride(patch_size: list[int], strides: list[list[int]]) -> list[int]:
    """Smallest patch >= ``patch_size`` divisible by the total stride on every axis."""
    return [int(math.ceil(p / t) * t) for p, t in zip(patch_size, total_stride(strides))]


def initial_patch_size(spacing: list[float], median_shape: list[float], dim: int) -> list[int]:
    """Starting patch: a cube of 256³ voxels (2D: 2048² pixels) reshaped to be isotropic in mm, then clipped
    to the median image shape (no point in a patch larger than the images)."""
    budget = 256**3 if dim == 3 else 2048**2
    inv = [1.0 / s for s in spacing]
    prod = math.prod(inv)
    scale = (budget / prod) ** (1.0 / dim)
    patch = [round(v * scale) for v in inv]
    return [int(max(1, min(p, m))) for p, m in zip(patch, median_shape)]
