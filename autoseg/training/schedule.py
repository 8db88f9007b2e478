"""Polynomial learning-rate decay: ``lr(epoch) = initial * (1 - epoch / epochs) ** exponent`` (with a time
budget, ``epoch / epochs`` is the fraction of the budget used)."""

from __future__ import annotations

import math

import torch


def poly_lr(initial_lr: float, epoch: float, epochs: float, exponent: float = 0.9) -> float:
    return initial_lr * (1 - min(epoch, epochs) / epochs) ** exponent


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
