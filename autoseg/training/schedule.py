"""Learning-rate schedules over the fraction ``f`` of the run done (``epoch / epochs``; with a time budget the
fraction of the budget used). Polynomial decay: ``lr = initial * (1 - f) ** exponent``; cosine:
``lr = initial * (1 + cos(pi f)) / 2``. With a warmup over the first ``w`` of the run the rate rises linearly
from ``initial / 10`` to ``initial`` (the first epoch is not wasted at rate 0), then the decay runs over the rest.
"""

from __future__ import annotations

import math

import torch


def poly_lr(initial_lr: float, epoch: float, epochs: float, exponent: float = 0.9) -> float:
    return initial_lr * (1 - min(epoch, epochs) / epochs) ** exponent


WARMUP_START = 0.1
"""Rate at the start of a warmup, as a fraction of the initial rate."""


def scheduled_lr(initial_lr: float, fraction: float, schedule: str, exponent: float, warmup: float) -> float:
    """The rate after ``fraction`` (0..1, clipped) of the run for ``schedule`` "poly" or "cosine" with a linear
    warmup over the first ``warmup`` of the run (0: none)."""
    f = min(max(fraction, 0.0), 1.0)
    if f < warmup:
        return initial_lr * (WARMUP_START + (1 - WARMUP_START) * f / warmup)
    rest = (f - warmup) / (1 - warmup)
    if schedule == "cosine":
        return initial_lr * 0.5 * (1 + math.cos(math.pi * rest))
    return initial_lr * (1 - rest) ** exponent


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def budget_epochs(budget_seconds: float, elapsed_seconds: float, epochs_done: int, max_epochs: int) -> int:
    """Total epochs for a time budget: those done plus enough more to use the remaining time at the mean
    epoch time so far (rounded up: the training loop cuts the last one when the budget runs out); never
    fewer than done, never more than ``max_epochs``."""
    if epochs_done <= 0:
        return max_epochs
    per_epoch = elapsed_seconds / epochs_done
    remaining = budget_seconds - elapsed_seconds
    if remaining <= 0:
        return epochs_done
    more = math.ceil(remaining / per_epoch) if per_epoch > 0 else max_epochs
    return int(min(max_epochs, epochs_done + more))
