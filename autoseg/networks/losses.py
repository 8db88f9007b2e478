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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autoseg.distance import signed_distance
from autoseg.loss_spec import LossExpression, LossTerm

__all__ = ["signed_distance"]  # re-exported: the boundary loss's definition of the map


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
    """Applies ``loss`` to every output against a nearest-downsampled target, weighted as in the docstring.
    ``maps`` (signed distances for a boundary term) are downsampled the same way, values unchanged."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(
        self,
        outputs: list[torch.Tensor] | torch.Tensor,
        target: torch.Tensor,
        maps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        same = all(out.shape == outputs[0].shape for out in outputs)
        weights = deep_supervision_weights(len(outputs), same_resolution=same)
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(weights, outputs):
            if w == 0:
                continue
            size = out.shape[2:]
            t = target if size == target.shape[2:] else downsample_target(target, size)
            if maps is None:
                value = self.loss(out, t)
            else:
                m = maps if size == maps.shape[2:] else F.interpolate(maps, size=tuple(size), mode="nearest")
                value = self.loss(out, t, m)
            total = total + w * value if len(outputs) > 1 else value
        return total


def downsample_target(target: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return F.interpolate(target.float(), size=tuple(size), mode="nearest").to(target.dtype)


# --- the losses of a loss expression (autoseg.loss_spec) --------------------------------------------------
#
# Every term takes the logits of one output and what the terms of that output share (:class:`_Shared`).
# Overlap terms see the masked probabilities and one-hot truth of the foreground classes (softmax) or of the
# regions (sigmoid); with ``batch_dice`` their sums run over the batch as one volume. Minimum values:
#   ce, wce       cross-entropy (binary per region), minimum 0; wce/ce(weights=...) weight the classes
#   dice          -mean_c (2 TP + s) / (sum p + sum g + s)                     nnU-Net's form, minimum -1
#   dice_sq       -mean_c (2 TP + s) / (sum p^2 + sum g^2 + s)                 V-Net's form, minimum -1
#   gdice         1 - 2 sum_c w_c TP_c / sum_c w_c (sum p + sum g), w_c = 1/(sum g_c)^2, every class
#                 (background too, Sudre et al. 2017); a class absent from the truth gets the largest weight
#   focal         mean over voxels of -(1 - p_t)^gamma log p_t (Lin et al. 2017); gamma = 0 is ce
#   tversky       1 - mean_c (TP + s) / (TP + alpha FP + beta FN + s)  (Salehi et al. 2017), minimum 0
#   focal_tversky mean_c (1 - TI_c)^(1/gamma)  (Abraham & Khan 2019), minimum 0
#   lovasz        Lovász extension of the Jaccard loss on |truth - p| per class present in the batch (every
#                 class, background too; Berman et al. 2018); per region on its sigmoid probability
#   boundary      mean over valid voxels and foreground classes of p * phi, phi the signed distance map of the
#                 class's truth (Kervadec et al. 2019; :func:`autoseg.distance.signed_distance`, in voxels).
#                 Training passes the maps computed once from the whole case (``maps``: stored beside the
#                 case, cropped, augmented and mirrored with the labels, nearest-downsampled for deep
#                 supervision, in voxels of the configuration's spacing at every level); without them phi is
#                 computed on the CPU from the target the loss is given (the patch alone, so distances stop at
#                 the patch border). Minimum: the sum of phi inside the truth (<= 0); meant beside a region
#                 loss (dice+ce+0.01*boundary)


class _Shared:
    """What the terms of one output share, computed on first use. Softmax: ``target`` ``(B, *spatial)``
    with ignore voxels set to 0 and ``valid`` their mask (None without an ignore label). Regions: ``truth``
    ``(B, R, *spatial)`` and ``mask`` (None without an ignore label)."""

    def __init__(self, logits, target, regions, ignore_label, batch_dice, smooth, maps=None):
        self.raw_logits, self.regions, self.ignore_label = logits, regions, ignore_label
        self.maps = maps  # (B, C_fg, *spatial) signed distances of the foreground structures, or None
        self.batch_dice, self.smooth = batch_dice, smooth
        self.logits = logits if logits.dtype == torch.float64 else logits.float()
        self._cache: dict = {}
        if regions is not None:
            self.truth = region_targets(target, regions).to(self.logits.dtype)
            self.mask = None
            if ignore_label is not None:
                self.mask = (target != ignore_label).to(self.logits.dtype).expand_as(self.logits)
            return
        self.raw_target = target[:, 0].long()
        self.valid = None if ignore_label is None else self.raw_target != ignore_label
        self.target = (
            self.raw_target
            if self.valid is None
            else torch.where(self.valid, self.raw_target, torch.zeros_like(self.raw_target))
        )

    def foreground(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked probabilities and truth of the foreground classes (softmax) or the regions."""
        if "fg" not in self._cache:
            if self.regions is not None:
                probs, truth = torch.sigmoid(self.logits), self.truth
                if self.mask is not None:
                    probs, truth = probs * self.mask, truth * self.mask
            else:
                probs = torch.softmax(self.logits, dim=1)[:, 1:]
                truth = F.one_hot(self.target, self.logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
                if self.valid is not None:
                    mask = self.valid[:, None].to(probs.dtype)
                    probs, truth = probs * mask, truth * mask
            self._cache["fg"] = (probs, truth)
        return self._cache["fg"]

    def every_class(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked probabilities and truth of every class, background included (regions: as foreground)."""
        if self.regions is not None:
            return self.foreground()
        if "all" not in self._cache:
            probs = torch.softmax(self.logits, dim=1)
            truth = F.one_hot(self.target, self.logits.shape[1]).movedim(-1, 1).to(probs.dtype)
            if self.valid is not None:
                mask = self.valid[:, None].to(probs.dtype)
                probs, truth = probs * mask, truth * mask
            self._cache["all"] = (probs, truth)
        return self._cache["all"]

    def valid_voxels(self) -> torch.Tensor | None:
        """``(B, *spatial)`` bool: the voxels not of the ignore label (None without an ignore label)."""
        if self.regions is not None:
            return None if self.mask is None else self.mask[:, 0] > 0
        return self.valid

    def sum_axes(self, ndim: int) -> tuple[int, ...]:
        axes = tuple(range(2, ndim))
        return (0,) + axes if self.batch_dice else axes


def _ce(s: _Shared, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy as :class:`DiceCELoss` (softmax) and :class:`RegionDiceBCELoss` (regions) compute it."""
    if s.regions is not None:
        if s.mask is None:
            return F.binary_cross_entropy_with_logits(s.logits, s.truth)
        bce = F.binary_cross_entropy_with_logits(s.logits, s.truth, weight=s.mask, reduction="sum")
        return bce / s.mask.sum().clamp_min(1)
    logits = s.raw_logits
    if weights is not None:
        weights = weights.to(device=logits.device, dtype=s.logits.dtype)
    if s.valid is None:
        return F.cross_entropy(logits, s.target, weight=weights)
    if not s.valid.any():
        return logits.sum() * 0
    return F.cross_entropy(logits, s.raw_target, weight=weights, ignore_index=s.ignore_label)


def _dice(s: _Shared) -> torch.Tensor:
    probs, truth = s.foreground()
    return -_soft_dice(probs, truth, s.batch_dice, s.smooth)


def _dice_sq(s: _Shared) -> torch.Tensor:
    probs, truth = s.foreground()
    axes = s.sum_axes(probs.ndim)
    intersect = (probs * truth).sum(axes)
    denom = (probs * probs).sum(axes) + (truth * truth).sum(axes)
    return -((2 * intersect + s.smooth) / (denom + s.smooth).clamp_min(1e-8)).mean()


def _gdice(s: _Shared) -> torch.Tensor:
    probs, truth = s.every_class()
    axes = s.sum_axes(probs.ndim)
    intersect, volume = (probs * truth).sum(axes), truth.sum(axes)
    denom = probs.sum(axes) + volume
    present = volume > 0
    weight = torch.where(present, 1 / torch.where(present, volume, torch.ones_like(volume)) ** 2, 0)
    weight = torch.where(present, weight, weight.amax(-1, keepdim=True))
    weight = torch.where(weight > 0, weight, torch.ones_like(weight))  # nothing present: equal weights
    weight = weight / weight.sum(-1, keepdim=True)  # GD is scale-free in w; this keeps the sums O(1)
    gd = 2 * (weight * intersect).sum(-1) / (weight * denom).sum(-1).clamp_min(1e-8)
    return 1 - gd.mean()


def _focal(s: _Shared, gamma: float) -> torch.Tensor:
    if s.regions is not None:
        log_pt = -F.binary_cross_entropy_with_logits(s.logits, s.truth, reduction="none")
        weight = s.mask
    else:
        log_pt = torch.log_softmax(s.logits, dim=1).gather(1, s.target[:, None])[:, 0]
        weight = None if s.valid is None else s.valid.to(log_pt.dtype)
    loss = -((1 - log_pt.exp()).clamp_min(0) ** gamma) * log_pt
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(1)


def _tversky_index(s: _Shared, alpha: float, beta: float) -> torch.Tensor:
    """Per class (and per sample unless ``batch_dice``) Tversky index of the foreground."""
    probs, truth = s.foreground()
    axes = s.sum_axes(probs.ndim)
    tp = (probs * truth).sum(axes)
    fp = probs.sum(axes) - tp
    fn = truth.sum(axes) - tp
    return (tp + s.smooth) / (tp + alpha * fp + beta * fn + s.smooth).clamp_min(1e-8)


def _tversky(s: _Shared, alpha: float, beta: float) -> torch.Tensor:
    return 1 - _tversky_index(s, alpha, beta).mean()


def _focal_tversky(s: _Shared, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    return ((1 - _tversky_index(s, alpha, beta)).clamp_min(0) ** (1 / gamma)).mean()


def lovasz_jaccard_grad(truth_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss at ``truth_sorted`` (0/1 truth, ordered by
    decreasing error): ``J_i - J_{i-1}`` of the Jaccard losses of the first ``i`` voxels."""
    total = truth_sorted.sum()
    intersection = total - truth_sorted.cumsum(0)
    union = total + (1 - truth_sorted).cumsum(0)
    jaccard = 1 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def _lovasz(s: _Shared) -> torch.Tensor:
    probs, truth = s.every_class()
    probs = probs.movedim(1, -1).reshape(-1, probs.shape[1])
    truth = truth.movedim(1, -1).reshape(-1, truth.shape[1])
    valid = s.valid_voxels()
    if valid is not None:
        keep = valid.reshape(-1)
        probs, truth = probs[keep], truth[keep]
    losses = []
    for c in range(probs.shape[1]):
        if truth[:, c].sum() == 0:
            continue  # only classes present in the batch (the Lovász-softmax paper's "present")
        errors = (truth[:, c] - probs[:, c]).abs()
        errors, order = errors.sort(descending=True)
        losses.append(errors @ lovasz_jaccard_grad(truth[order, c]))
    return torch.stack(losses).mean() if losses else s.logits.sum() * 0


def _boundary(s: _Shared) -> torch.Tensor:
    probs, truth = s.foreground()
    if s.maps is not None:  # stored with the case, cropped and augmented with the labels
        phi = s.maps.to(device=probs.device, dtype=probs.dtype)
    else:
        flat = truth.detach().cpu().numpy().reshape(-1, *truth.shape[2:]) > 0.5
        phi = np.stack([signed_distance(m) for m in flat]).reshape(truth.shape)
        phi = torch.from_numpy(phi).to(device=probs.device, dtype=probs.dtype)
    valid = s.valid_voxels()
    voxels = probs[:, 0].numel() if valid is None else int(valid.sum())
    return (probs * phi).sum() / max(probs.shape[1] * voxels, 1)


_TERMS = {
    "ce": _ce,
    "wce": _ce,
    "dice": _dice,
    "dice_sq": _dice_sq,
    "gdice": _gdice,
    "focal": _focal,
    "tversky": _tversky,
    "focal_tversky": _focal_tversky,
    "lovasz": _lovasz,
    "boundary": _boundary,
}


class CompositeLoss(nn.Module):
    """The weighted sum of a loss expression's terms (:class:`autoseg.loss_spec.LossExpression`) on one
    output: softmax classes, or one sigmoid per region with ``regions``; ``ignore_label`` voxels are masked
    in every term. ``class_weights`` are the weights of terms with ``weights=auto``. ``dice+ce`` gives,
    bit for bit, :class:`DiceCELoss` (:class:`RegionDiceBCELoss` with regions)."""

    def __init__(
        self,
        expr: LossExpression,
        regions: list[list[int]] | None = None,
        batch_dice: bool = False,
        smooth: float = 1e-5,
        ignore_label: int | None = None,
        class_weights: list[float] | None = None,
    ):
        super().__init__()
        self.expr = expr
        self.regions = None if regions is None else [list(r) for r in regions]
        self.batch_dice, self.smooth, self.ignore_label = batch_dice, smooth, ignore_label
        self.terms = [(t.weight, _TERMS[t.name], self._params(t, class_weights)) for t in expr.terms]

    @staticmethod
    def _params(term: LossTerm, class_weights: list[float] | None) -> dict:
        params = dict(term.params)
        if "weights" in params:
            weights = params.pop("weights")
            if weights == "auto":
                if class_weights is None:
                    raise ValueError(f"{term.name}(weights=auto) needs the class weights")
                weights = class_weights
            params["weights"] = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        return params

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, maps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``logits`` ``(B, K or R, *spatial)``; ``target`` ``(B, 1, *spatial)`` integer label map; ``maps``
        ``(B, K - 1 or R, *spatial)`` signed distances of the foreground classes or regions for ``boundary``
        (None: computed from ``target``)."""
        shared = _Shared(logits, target, self.regions, self.ignore_label, self.batch_dice, self.smooth, maps)
        total = None
        for weight, fn, params in self.terms:
            value = fn(shared, **params)
            value = value if weight == 1 else weight * value
            total = value if total is None else total + value
        return total
