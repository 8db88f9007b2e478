"""The boundary loss with the signed distance maps a batch carries (stored with the case) against the
per-patch maps it computes without them; deep supervision hands each output maps downsampled like its
target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoseg.distance import label_distance_maps, signed_distance, structure_masks
from autoseg.loss_spec import parse_loss
from autoseg.networks.losses import CompositeLoss, DeepSupervisionLoss


def _batch(seed, k=3, shape=(2, 6, 7, 5)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((shape[0], k, *shape[1:]), generator=g, dtype=torch.float64)
    target = torch.randint(0, k, (shape[0], 1, *shape[1:]), generator=g)
    return logits, target


def _maps(target, channels, ignore_label=None):
    """Maps that coincide with the patch's own: those of the patch's truth (float64, as the loss's own)."""
    t = target[:, 0].numpy()
    per_sample = [[signed_distance(m) for m in structure_masks(x, channels, ignore_label)] for x in t]
    return torch.from_numpy(np.array(per_sample))


def test_precomputed_maps_give_the_per_patch_value_where_they_coincide():
    logits, target = _batch(0)
    for text in ("boundary", "dice+ce+0.01*boundary"):
        loss = CompositeLoss(parse_loss(text))
        assert torch.equal(loss(logits, target, _maps(target, [[1], [2]])), loss(logits, target))
    # with an ignore label (its voxels belong to no class) and for regions
    masked = torch.where(target == 2, torch.full_like(target, 5), target)
    loss = CompositeLoss(parse_loss("boundary"), ignore_label=5)
    assert torch.equal(loss(logits, masked, _maps(masked, [[1], [2]], 5)), loss(logits, masked))
    region = CompositeLoss(parse_loss("boundary"), regions=[[1, 2], [2]])
    maps = _maps(target, [[1, 2], [2]])
    assert torch.equal(region(logits[:, :2], target, maps), region(logits[:, :2], target))
    # as stored (float16): the same to float16's rounding of the distances
    stored = np.stack([label_distance_maps(x, [[1], [2]]) for x in target[:, 0].numpy()]).astype(np.float16)
    loss = CompositeLoss(parse_loss("boundary"))
    assert float(loss(logits, target, torch.from_numpy(stored))) == pytest.approx(
        float(loss(logits, target)), rel=1e-3
    )
    loss = CompositeLoss(parse_loss("boundary"), ignore_label=5)
    # the maps are used: whole-case maps that differ from the patch's change the value
    assert not torch.equal(loss(logits, masked, _maps(masked, [[1], [2]], 5) + 1), loss(logits, masked))


class _Spy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, out, target, maps=None):
        self.calls.append((out.shape[2:], target, maps))
        return out.sum() * 0


def test_deep_supervision_downsamples_the_maps_like_the_target():
    _, target = _batch(1, shape=(2, 8, 8, 4))
    maps = _maps(target, [[1], [2]]).float()
    outs = [torch.zeros(2, 3, 8, 8, 4), torch.zeros(2, 3, 4, 4, 2), torch.zeros(2, 3, 2, 2, 1)]
    spy = _Spy()
    DeepSupervisionLoss(spy)(outs, target, maps)
    assert [c[0] for c in spy.calls] == [(8, 8, 4), (4, 4, 2)]  # the lowest output weighs 0
    assert spy.calls[0][2] is maps
    _, t, m = spy.calls[1]
    assert m.shape == (2, 2, 4, 4, 2)
    for c in (1, 2):  # the same voxels picked: inside the structure exactly where the target says so
        assert torch.equal(m[:, c - 1] <= 0, t[:, 0] == c)
    assert torch.equal(m, maps[:, :, ::2, ::2, ::2])  # values in the full-resolution voxels, not rescaled
    spy.calls.clear()
    DeepSupervisionLoss(spy)(outs, target)
    assert all(c[2] is None for c in spy.calls)
