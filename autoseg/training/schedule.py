"""Polynomial learning-rate decay: ``lr(epoch) = initial * (1 - epoch / epochs) ** exponent``."""

from __future__ import annotations

import torch


def poly_lr(initial_lr: float, epoch: int, epochs: int, exponent: float = 0.9) -> float:
    return initial_lr * (1 - min(epoch, epochs) / epochs) ** exponent


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
