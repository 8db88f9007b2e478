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

    Stage 0 has stride 1. Each further stage halves every axis whose feature map would still be >=
    ``MIN_FEATURE_MAP`` voxels and whose current spacing is within ``SPACING_RATIO`` of the finest current
    spacing; stages stop when no axis can be pooled or ``max_stages`` is reached. Kernels are 3 along axes
    within ``SPACING_RATIO`` of the finest spacing and 1 along axes still too coarse (so a 3-wide kernel does
    not mix distant slices before in-plane pooling has caught up).
    """
    dim = len(patch_size)
    max_stages = max_stages or MAX_STAGES[dim]
    size = [int(s) for s in patch_size]
    sp = [float(s) for s in spacing]

    def kernel(current: list[float]) -> list[int]:
        finest = min(current)
        return [3 if s <= SPACING_RATIO * finest else 1 for s in current]

    strides = [[1] * dim]
    kernels = [kernel(sp)]
    while len(strides) < max_stages:
        finest = min(sp)
        stride = [
            2 if size[a] // 2 >= MIN_FEATURE_MAP and sp[a] <= SPACING_RATIO * finest else 1 for a in range(dim)
        ]
        if all(s == 1 for s in stride):
            break
        size = [n // s for n, s in zip(size, stride)]
        sp = [v * s for v, s in zip(sp, stride)]
        strides.append(stride)
        kernels.append(kernel(sp))
    return strides, kernels


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
