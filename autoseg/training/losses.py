"""Dice + cross-entropy with deep supervision.

Soft Dice is computed on softmax probabilities over the foreground classes only (background excluded), per
sample or, with ``batch_dice``, over the whole batch as one volume; ``smooth = 1e-5``. The loss is
``CE - mean Dice`` (so a perfect prediction reaches ``-1``). Deep supervision weights the decoder outputs
``1, 1/2, 1/4, ...`` (highest resolution first), gives the lowest resolution weight 0, and normalises to 1.
Targets for lower resolutions are the label map downsampled with nearest neighbour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DiceCELoss(nn.Module):
    def __init__(self, batch_dice: bool = False, smooth: float = 1e-5):
        super().__init__()
        self.batch_dice = batch_dice
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` ``(B, K, *spatial)``; ``target`` ``(B, 1, *spatial)`` integer labels in ``[0, K)``."""
        target = target[:, 0].long()
        ce = F.cross_entropy(logits, target)
        probs = torch.softmax(logits.float(), dim=1)[:, 1:]
        onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
        axes = tuple(range(2, logits.ndim))
        if self.batch_dice:
            axes = (0,) + axes
        intersect = (probs * onehot).sum(axes)
        denom = probs.sum(axes) + onehot.sum(axes)
        dice = (2 * intersect + self.smooth) / (denom + self.smooth).clamp_min(1e-8)
        return ce - dice.mean()


def deep_supervision_weights(n_outputs: int) -> list[float]:
    if n_outputs == 1:
        return [1.0]
    w = [1 / 2**i for i in range(n_outputs)]
    w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


class DeepSupervisionLoss(nn.Module):
    """Applies ``loss`` to every output against a nearest-downsampled target, weighted as in the docstring."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, outputs: list[torch.Tensor] | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = deep_supervision_weights(len(outputs))
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(weights, outputs):
            if w == 0:
                continue
            t = target if out.shape[2:] == target.shape[2:] else downsample_target(target, out.shape[2:])
            total = total + w * self.loss(out, t)
        return total


def downsample_target(target: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return F.interpolate(target.float(), size=tuple(size), mode="nearest").to(target.dtype)
