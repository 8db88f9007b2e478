"""Residual-encoder U-Net built from a :class:`NetworkTopology` (2D or 3D, anisotropic strides/kernels)."""

from __future__ import annotations

import torch
from torch import nn

from autoseg.networks.blocks import ConvNormAct, conv_cls, norm_cls, same_padding
from autoseg.networks.unet import UNet
from autoseg.planning.network_topology import NetworkTopology

# residual blocks per encoder stage (as nnU-Net's ResEnc presets); stages past the list repeat the last entry
BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6)


def resenc_blocks_per_stage(n_stages: int) -> list[int]:
    """``[1, 3, 4, 6, 6, 6, ...]`` truncated or extended (with 6) to ``n_stages`` entries."""
    return [BLOCKS_PER_STAGE[min(s, len(BLOCKS_PER_STAGE) - 1)] for s in range(n_stages)]


def _pool_cls(dim: int) -> type[nn.Module]:
    return {2: nn.AvgPool2d, 3: nn.AvgPool3d}[dim]


class ResidualBlock(nn.Module):
    """Basic residual block: conv (carries ``stride``) → norm → act → conv → norm, plus the shortcut, → act.

    The shortcut is the identity, preceded by average pooling (kernel = stride) when the block downsamples and
    followed by a 1×1 convolution (no bias) + instance norm when the channel count changes, so it always has
    the shape of the main path. Norm is affine instance norm, act LeakyReLU(0.01), as in :mod:`.blocks`.
    """

    def __init__(
        self,
        dim: int,
        cin: int,
        cout: int,
        kernel: list[int],
        stride: list[int] | int = 1,
        dilation: list[int] | int = 1,
    ):
        """``dilation`` (per axis) spreads both convolutions' kernels (DeepLab's atrous stages)."""
        super().__init__()
        stride = [stride] * dim if isinstance(stride, int) else list(stride)
        self.conv1 = ConvNormAct(dim, cin, cout, kernel, stride, dilation)
        pad = same_padding(kernel, dilation)
        self.conv2 = nn.Sequential(
            conv_cls(dim)(cout, cout, kernel, padding=pad, dilation=dilation, bias=True),
            norm_cls(dim)(cout, eps=1e-5, affine=True),
        )
        shortcut: list[nn.Module] = []
        if any(s != 1 for s in stride):
            shortcut.append(_pool_cls(dim)(stride, stride))
        if cin != cout:
            shortcut += [conv_cls(dim)(cin, cout, 1, bias=False), norm_cls(dim)(cout, eps=1e-5, affine=True)]
        self.shortcut = nn.Sequential(*shortcut) if shortcut else nn.Identity()
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


def residual_encoder(topo: NetworkTopology, in_channels: int) -> nn.ModuleList:
    """Encoder stages made of :class:`ResidualBlock` stacks (the first block of a stage carries its stride).

    Blocks per encoder stage: 1, 3, 4, 6, 6, 6 (then 6), as nnU-Net's residual-encoder presets
    (``BLOCKS_PER_STAGE``). There is no stem: the
    first block of stage 0 projects the input channels onto its shortcut with a 1×1 convolution. The decoder is
    the plain one of :class:`autoseg.networks.unet.UNet`.
    """
    stages = nn.ModuleList()
    cin = in_channels
    for s, blocks in enumerate(resenc_blocks_per_stage(topo.n_stages)):
        k, f = topo.kernel_sizes[s], topo.features_per_stage[s]
        stage = [ResidualBlock(topo.dim, cin, f, k, topo.strides[s])]
        stage += [ResidualBlock(topo.dim, f, f, k) for _ in range(blocks - 1)]
        stages.append(nn.Sequential(*stage))
        cin = f
    return stages


def build_resenc(topo: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    return UNet(topo, in_channels, num_classes, encoder=residual_encoder(topo, in_channels))
