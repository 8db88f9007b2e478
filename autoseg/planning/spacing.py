"""Target spacing and axis order rules (pure functions on the fingerprint's spacings and shapes)."""

from __future__ import annotations

import numpy as np

ANISOTROPY_THRESHOLD = 3.0


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[list[float], str]:
    """Median spacing per axis, with nnU-Net's anisotropy rule.

    ``spacings``/``shapes`` are ``(n_cases, 3)`` in array order. If the coarsest median axis is more than 3×
    coarser than the finest and has fewer than a third of the voxels of the other axes, the median would force
    heavy interpolation across thick slices, so that axis takes the 10th percentile of its spacings instead
    (but never finer than the other axes). Returns the spacing and a reason.
    """
    spacings = np.asarray(spacings, dtype=float)
    shapes = np.asarray(shapes, dtype=float)
    target = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    anisotropic_spacing = target[worst] > ANISOTROPY_THRESHOLD * min(target[others])
    few_slices = median_shape[worst] * ANISOTROPY_THRESHOLD < min(median_shape[others])
    if anisotropic_spacing and few_slices:
        p10 = float(np.percentile(spacings[:, worst], 10))
        floor = float(max(target[others]))
        new = max(p10, floor + 1e-5) if p10 < floor else p10
        reason = (
            f"axis {worst} is anisotropic (median {target[worst]:.3g} mm > {ANISOTROPY_THRESHOLD:g}× "
            f"{min(target[others]):.3g} mm, {median_shape[worst]:.0f} voxels): it takes the 10th percentile "
            f"{new:.3g} mm"
        )
        target[worst] = new
    else:
        reason = "median spacing per axis"
    return [float(v) for v in target], reason


ISOTROPY_TOLERANCE = 0.01


def transpose_coarse_first(spacing: list[float]) -> list[int]:
    """Permutation that puts the coarsest axis first, keeping the others in order (stable).

    Spacings within 1 % of each other count as equal, so float noise in headers (0.99999988 vs 1.0 mm) does
    not reorder the axes of isotropic data; the identity is returned when no axis is clearly coarsest.
    """
    sp = np.asarray(spacing, dtype=float)
    if sp.max() <= sp.min() * (1 + ISOTROPY_TOLERANCE):
        return list(range(len(spacing)))
    worst = int(np.argmax(sp))
    return [worst] + [a for a in range(len(spacing)) if a != worst]
