"""Residual U-Net with squeeze-and-excitation (Hu et al. 2018) blocks in encoder and decoder, built from a
:class:`NetworkTopology` (2D or 3D, anisotropic strides/kernels)."""

from __future__ import annotations

import torch
from torch import nn

from autoseg.networks.blocks import conv_cls
from autoseg.networks.resenc import ResidualBlock
from autoseg.networks.unet import UNet
from autoseg.planning.network_topology import NetworkTopology

SE_REDUCTION = 16  # Hu et al.'s reduction ratio r
SE_MIN_HIDDEN = 4  # narrow stages keep at least this many hidden units (at most their width)


class SqueezeExcitation(nn.Module):
    """Channel recalibration: global average over space (squeeze), 1×1 convolution to ``C / 16`` channels
    (at least ``min(C, 4)``), ReLU, 1×1 convolution back to ``C``, sigmoid (excitation); the input is scaled
    channel-wise by the result."""

    def __init__(self, dim: int, channels: int):
        super().__init__()
        hidden = min(channels, max(channels // SE_REDUCTION, SE_MIN_HIDDEN))
        self.axes = tuple(range(2, 2 + dim))
        self.fc = nn.Sequential(
            conv_cls(dim)(channels, hidden, 1),
            nn.ReLU(inplace=True),
            conv_cls(dim)(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=self.axes, keepdim=True))


class SEResidualBlock(ResidualBlock):
    """:class:`ResidualBlock` whose residual branch is recalibrated by :class:`SqueezeExcitation` before the
    shortcut is added (the SE-ResNet placement): ``act(se(conv2(conv1(x))) + shortcut(x))``."""

    def __init__(self, dim: int, cin: int, cout: int, kernel: list[int], stride: list[int] | int = 1):
        super().__init__(dim, cin, cout, kernel, stride)
        self.se = SqueezeExcitation(dim, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.se(self.conv2(self.conv1(x))) + self.shortcut(x))


def se_residual_encoder(topo: NetworkTopology, in_channels: int) -> nn.ModuleList:
    """One :class:`SEResidualBlock` per stage (two convolutions, the first carrying the stage's stride)."""
    stages = nn.ModuleList()
    cin = in_channels
    for s in range(topo.n_stages):
        f = topo.features_per_stage[s]
        stages.append(SEResidualBlock(topo.dim, cin, f, topo.kernel_sizes[s], topo.strides[s]))
        cin = f
    return stages


def build_resse_unet(topo: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    """:class:`UNet` with :class:`SEResidualBlock` stages: one per encoder stage, and one per decoder stage
    after the concatenation (its shortcut projects the 2× channels with a 1×1 convolution). Deep supervision as
    U-Net."""

    def decoder_block(cin: int, cout: int, kernel: list[int]) -> nn.Module:
        return SEResidualBlock(topo.dim, cin, cout, kernel)

    encoder = se_residual_encoder(topo, in_channels)
    return UNet(topo, in_channels, num_classes, encoder=encoder, decoder_block=decoder_block)
