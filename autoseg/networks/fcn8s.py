"""FCN-8s (Long, Shelhamer & Darrell 2015) built from a :class:`NetworkTopology` (2D or 3D, anisotropic
strides/kernels): class scores from three depths of a fully convolutional encoder, fused coarse to fine and
upsampled with transposed convolutions."""

from __future__ import annotations

import math

import torch
from torch import nn

from autoseg.networks.blocks import StackedConvs, conv_cls, network_outputs, transp_conv_cls
from autoseg.planning.network_topology import NetworkTopology

FUSED_DEPTHS = 3  # FCN-8s: the scores of the last three stages (pool3, pool4 and the final stage in VGG)


def _upsample(dim: int, channels: int, stride: list[int]) -> nn.Module:
    """A transposed convolution with kernel = stride (non-overlapping, so sizes multiply exactly), or the
    identity for a stride of ones."""
    if all(s == 1 for s in stride):
        return nn.Identity()
    return transp_conv_cls(dim)(channels, channels, stride, stride=stride, bias=False)


class FCN8s(nn.Module):
    """Encoder: one :class:`StackedConvs` per stage (strided first convolution), as U-Net's.

    A 1×1 score layer (``num_classes`` channels) on each of the last three stages ``n-3, n-2, n-1`` (fewer
    when the topology has fewer stages). From the coarsest: its scores are upsampled by a transposed
    convolution (kernel = stride, learnt as the paper's 2× layers) to the next stage's grid and added to that
    stage's scores, twice; the fused scores are then upsampled to full resolution by one transposed
    convolution with kernel = stride = the total stride of stage ``n-3`` (the paper's final 8× layer).
    Departures from the paper: kernels equal to the strides (the paper's 2×-wide, bilinear-initialised kernels
    need cropping); no VGG fc6/fc7 (the deepest stage's convolutions take their place).

    No natural deep supervision: in training mode with deep supervision the full-resolution logits come as a
    one-element list; otherwise as a tensor.
    """

    def __init__(self, topo: NetworkTopology, in_channels: int, num_classes: int):
        super().__init__()
        dim, feats, n = topo.dim, topo.features_per_stage, topo.n_stages
        self.deep_supervision = topo.deep_supervision
        self.encoder = nn.ModuleList()
        cin = in_channels
        for s in range(n):
            self.encoder.append(
                StackedConvs(dim, cin, feats[s], topo.kernel_sizes[s], topo.strides[s], topo.n_conv_per_stage)
            )
            cin = feats[s]
        self.first_scored = max(n - FUSED_DEPTHS, 0)
        scored = range(self.first_scored, n)
        self.scores = nn.ModuleList(conv_cls(dim)(feats[s], num_classes, 1) for s in scored)
        # upsampling from stage s to stage s - 1, coarsest first
        self.fuse_up = nn.ModuleList(
            _upsample(dim, num_classes, topo.strides[s]) for s in range(n - 1, self.first_scored, -1)
        )
        to_full = [math.prod(st[a] for st in topo.strides[: self.first_scored + 1]) for a in range(dim)]
        self.final_up = _upsample(dim, num_classes, to_full)

    def output_layers(self) -> list[nn.Module]:
        """None: the fused class scores pass through bias-free transposed convolutions that mix the classes,
        so no bias sets the initial logits (see :mod:`autoseg.networks.heads`)."""
        return []

    def forward(self, x: torch.Tensor):
        features = []
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        scores = [score(f) for score, f in zip(self.scores, features[self.first_scored :])]
        fused = scores.pop()
        for up in self.fuse_up:
            fused = up(fused) + scores.pop()
        logits = self.final_up(fused)
        return network_outputs([logits], self.deep_supervision and self.training)


def build_fcn8s(topo: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    return FCN8s(topo, in_channels, num_classes)
