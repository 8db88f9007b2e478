"""Class weights for weighted cross-entropy (``wce`` or ``ce(weights=auto)``), and the output prior, from the
fingerprint's label frequencies.

The weights are the "balanced" inverse frequencies ``w_c = N / (K n_c)`` (``N`` voxels of all ``K`` classes,
``n_c`` of class ``c``), so a class of average frequency weighs 1. A class no case contains gets the largest
weight of the others. Counts are the fingerprint's: per case and foreground label its voxels in the original
image; background is the rest of each image (voxels of the ignore label, which the fingerprint does not
count, are counted as background; they are masked in the loss anyway).

The output prior (:func:`output_prior`) is what training writes into the networks' output biases before the
first step: the log frequency of each class (softmax outputs), or the log-odds of each region's frequency
(one sigmoid per region), frequencies clipped to ``[PRIOR_FLOOR, 1 - PRIOR_FLOOR]``.
"""

from __future__ import annotations

import math

from autoseg.fingerprint import Fingerprint
from autoseg.planning.plans import Plans


def balanced_weights(counts: list[int]) -> list[float]:
    """``N / (K n_c)`` per class; classes with no voxel get the largest weight of those with some (1 each
    when no class has any)."""
    total, k = sum(counts), len(counts)
    weights = [total / (k * n) if n > 0 else 0.0 for n in counts]
    largest = max(weights) or 1.0
    return [w if w > 0 else largest for w in weights]


def class_voxel_counts(fingerprint: Fingerprint, plans: Plans) -> list[int]:
    """Voxels per class ``0 .. num_classes-1`` over every case of the fingerprint."""
    names = {v: k for k, v in plans.labels.items()}
    counts = [0] * plans.num_classes
    for case in fingerprint.cases:
        foreground = 0
        for c in range(1, plans.num_classes):
            n = case.label_voxels.get(names.get(c, str(c)), 0)
            counts[c] += n
            foreground += n
        counts[0] += max(0, math.prod(case.shape_before_crop) - foreground)
    return counts


def class_weights(fingerprint: Fingerprint, plans: Plans) -> list[float]:
    return balanced_weights(class_voxel_counts(fingerprint, plans))


PRIOR_FLOOR = 1e-6
"""A class with no voxel gets this frequency in the prior (a logit of about -13.8, not minus infinity)."""


def output_prior(fingerprint: Fingerprint, plans: Plans) -> list[float]:
    """One initial bias per output channel: ``log f_c`` per class, or ``log(f_r / (1 - f_r))`` per region."""
    counts = class_voxel_counts(fingerprint, plans)
    total = max(sum(counts), 1)

    def clip(f: float) -> float:
        return min(max(f, PRIOR_FLOOR), 1 - PRIOR_FLOOR)

    if plans.region_based:
        freqs = [clip(sum(counts[v] for v in region) / total) for region in plans.training_regions]
        return [math.log(f / (1 - f)) for f in freqs]
    return [math.log(clip(n / total)) for n in counts]
