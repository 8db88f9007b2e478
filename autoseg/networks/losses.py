"""Dice + cross-entropy with deep supervision.

Soft Dice is computed on softmax probabilities over the foreground classes only (background excluded), per
sample or, with ``batch_dice``, over the whole batch as one volume; ``smooth = 1e-5``. The loss is
``CE - mean Dice`` (so a perfect prediction reaches ``-1``). Deep supervision weights the decoder outputs
``1, 1/2, 1/4, ...`` (highest resolution first), gives the lowest resolution weight 0, and normalises to 1.
Targets for lower resolutions are the label map downsampled with nearest neighbour. Outputs that all have
the same size (UNet++'s nested full-resolution heads) weigh the same, ``1/n`` each, as in Zhou et al. 2018.

Region-based plans use :class:`RegionDiceBCELoss` instead: one sigmoid output per region (a union of label
values), binary cross-entropy plus soft Dice per region. Voxels of the ignore label count in neither term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _soft_dice(probs: torch.Tensor, truth: torch.Tensor, batch_dice: bool, smooth: float) -> torch.Tensor:
    """Mean soft Dice over channels of ``probs``/``truth`` ``(B, C, *spatial)`` (already masked)."""
    axes = tuple(range(2, probs.ndim))
    if batch_dice:
        axes = (0,) + axes
    intersect = (probs * truth).sum(axes)
    denom = probs.sum(axes) + truth.sum(axes)
    return ((2 * intersect + smooth) / (denom + smooth).clamp_min(1e-8)).mean()


class DiceCELoss(nn.Module):
    """Softmax cross-entropy + soft Dice over the foreground classes; ``ignore_label`` voxels are masked."""

    def __init__(self, batch_dice: bool = False, smooth: float = 1e-5, ignore_label: int | None = None):
        super().__init__()
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` ``(B, K, *spatial)``; ``target`` ``(B, 1, *spatial)`` integer labels in ``[0, K)`` (or the
        ignore label)."""
        target = target[:, 0].long()
        k = logits.shape[1]
        if self.ignore_label is not None:
            valid = target != self.ignore_label
            ce = (
                F.cross_entropy(logits, target, ignore_index=self.ignore_label)
                if valid.any()
                else logits.sum() * 0
            )
            target = torch.where(valid, target, torch.zeros_like(target))
        else:
            valid = None
            ce = F.cross_entropy(logits, target)
        probs = torch.softmax(logits.float(), dim=1)[:, 1:]
        onehot = F.one_hot(target, k).movedim(-1, 1)[:, 1:].to(probs.dtype)
        if valid is not None:
            mask = valid[:, None].to(probs.dtype)
            probs, onehot = probs * mask, onehot * mask
        return ce - _soft_dice(probs, onehot, self.batch_dice, self.smooth)


def region_targets(target: torch.Tensor, regions: list[list[int]]) -> torch.Tensor:
    """``(B, 1, *spatial)`` label map → ``(B, R, *spatial)`` float masks, one per region (union of values)."""
    t = target[:, 0]
    return torch.stack([torch.isin(t, torch.tensor(r, device=t.device)) for r in regions], dim=1).float()


class RegionDiceBCELoss(nn.Module):
    """Sigmoid per region: binary cross-entropy + soft Dice; ``ignore_label`` voxels are masked."""

    def __init__(
        self,
        regions: list[list[int]],
        batch_dice: bool = False,
        smooth: float = 1e-5,
        ignore_label: int | None = None,
    ):
        super().__init__()
        self.regions = [list(r) for r in regions]
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` ``(B, R, *spatial)``; ``target`` ``(B, 1, *spatial)`` integer label map."""
        truth = region_targets(target, self.regions)
        logits = logits.float()
        if self.ignore_label is not None:
            mask = (target != self.ignore_label).to(logits.dtype).expand_as(logits)
            bce = F.binary_cross_entropy_with_logits(
                logits, truth, weight=mask, reduction="sum"
            ) / mask.sum().clamp_min(1)
        else:
            mask = None
            bce = F.binary_cross_entropy_with_logits(logits, truth)
        probs = torch.sigmoid(logits)
        if mask is not None:
            probs, truth = probs * mask, truth * mask
        return bce - _soft_dice(probs, truth, self.batch_dice, self.smooth)


def deep_supervision_weights(n_outputs: int, same_resolution: bool = False) -> list[float]:
    """``1, 1/2, 1/4, ..., 0`` normalised; ``1/n`` each for outputs all at one resolution."""
    if n_outputs == 1:
        return [1.0]
    if same_resolution:
        return [1 / n_outputs] * n_outputs
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
        same = all(out.shape == outputs[0].shape for out in outputs)
        weights = deep_supervision_weights(len(outputs), same_resolution=same)
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(weights, outputs):
            if w == 0:
                continue
            t = target if out.shape[2:] == target.shape[2:] else downsample_target(target, out.shape[2:])
            total = total + w * self.loss(out, t)
        return total


def downsample_target(target: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return F.interpolate(target.float(), size=tuple(size), mode="nearest").to(target.dtype)
