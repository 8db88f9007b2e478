"""Learning-rate schedules over the fraction ``f`` of the run done (``epoch / epochs``; with a time budget the
fraction of the budget used). Polynomial decay: ``lr = initial * (1 - f) ** exponent``; cosine:
``lr = initial * (1 + cos(pi f)) / 2``; plateau: ``lr = initial * scale``, where the run's state lowers
``scale`` when the validation average stops improving (:class:`Plateau`). With a warmup over the first ``w`` of
the run the rate rises linearly from ``initial / 10`` to ``initial`` (the first epoch is not wasted at rate 0),
then the decay runs over the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def poly_lr(initial_lr: float, epoch: float, epochs: float, exponent: float = 0.9) -> float:
    return initial_lr * (1 - min(epoch, epochs) / epochs) ** exponent


WARMUP_START = 0.1
"""Rate at the start of a warmup, as a fraction of the initial rate."""


def scheduled_lr(
    initial_lr: float, fraction: float, schedule: str, exponent: float, warmup: float, scale: float = 1.0
) -> float:
    """The rate after ``fraction`` (0..1, clipped) of the run for ``schedule`` "poly", "cosine" or "plateau"
    (``initial_lr * scale``) with a linear warmup over the first ``warmup`` of the run (0: none)."""
    f = min(max(fraction, 0.0), 1.0)
    if f < warmup:
        return initial_lr * (WARMUP_START + (1 - WARMUP_START) * f / warmup)
    rest = (f - warmup) / (1 - warmup)
    if schedule == "cosine":
        return initial_lr * 0.5 * (1 + math.cos(math.pi * rest))
    if schedule == "plateau":
        return initial_lr * scale
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


MIN_PLATEAU_SCALE = 1e-3
"""A plateau schedule never lowers the rate below this fraction of the initial rate."""


@dataclass
class Plateau:
    """Reduce-on-plateau bookkeeping: the best validation average seen, the epochs since it last rose by
    ``threshold``, and the factor the rate is at. ``step`` after each epoch's average; it returns True when the
    rate was just lowered. Plain numbers, so that it goes into checkpoints (``to_json`` / ``from_json``)."""

    best: float = -math.inf
    wait: int = 0
    scale: float = 1.0

    def step(self, value: float | None, patience: int, factor: float, threshold: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if value > self.best + threshold:
            self.best, self.wait = value, 0
            return False
        self.wait += 1
        if self.wait < patience or self.scale <= MIN_PLATEAU_SCALE:
            return False
        self.scale, self.wait = max(self.scale * factor, MIN_PLATEAU_SCALE), 0
        return True

    def to_json(self) -> dict:
        return {
            "best": self.best if math.isfinite(self.best) else None,
            "wait": self.wait,
            "scale": self.scale,
        }

    @classmethod
    def from_json(cls, d) -> Plateau:
        if not isinstance(d, dict):
            return cls()
        best = d.get("best")
        return cls(
            -math.inf if best is None else float(best), int(d.get("wait", 0)), float(d.get("scale", 1.0))
        )
