"""Residual-encoder U-Net built from a :class:`NetworkTopology` (2D or 3D, anisotropic strides/kernels)."""

from __future__ import annotations

import torch
from torch import nn

from autoseg.networks import register
from autoseg.networks.blocks import ConvNormAct, StackedConvs, conv_cls, norm_cls, transp_conv_cls
from autoseg.planning.memory import resenc_blocks_per_stage
from autoseg.planning.plans import NetworkTopology


def _pool_cls(dim: int) -> type[nn.Module]:
    return {2: nn.AvgPool2d, 3: nn.AvgPool3d}[dim]


class ResidualBlock(nn.Module):
    """Basic residual block: conv (carries ``stride``) → norm → act → conv → norm, plus the shortcut, → act.

    The shortcut is the identity, preceded by average pooling (kernel = stride) when the block downsamples and
    followed by a 1×1 convolution (no bias) + instance norm when the channel count changes, so it always has
    the shape of the main path. Norm is affine instance norm, act LeakyReLU(0.01), as in :mod:`.blocks`.
    """

    def __init__(self, dim: int, cin: int, cout: int, kernel: list[int], stride: list[int] | int = 1):
        super().__init__()
        stride = [stride] * dim if isinstance(stride, int) else list(stride)
        self.conv1 = ConvNormAct(dim, cin, cout, kernel, stride)
        self.conv2 = nn.Sequential(
            conv_cls(dim)(cout, cout, kernel, padding=[k // 2 for k in kernel], bias=True),
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


class ResEncUNet(nn.Module):
    """U-Net whose encoder stages are stacks of :class:`ResidualBlock` (the first block of a stage carries its
    stride); the decoder is the plain one of :class:`autoseg.networks.unet.UNet` (transposed conv with kernel =
    stride, concatenation with the skip, ``n_conv_per_stage`` ConvNormAct, a 1×1 head per decoder stage).

    Blocks per encoder stage: 1, 3, 4, 6, 6, 6 (then 6), as nnU-Net's residual-encoder presets
    (``autoseg.planning.memory.RESENC_BLOCKS_PER_STAGE``, shared with the memory model). There is no stem: the
    first block of stage 0 projects the input channels onto its shortcut with a 1×1 convolution.

    ``forward(x)`` with ``x`` of shape ``(B, C, *patch)``: with deep supervision in training mode, a list of
    logits ``(B, K, ...)`` highest resolution first (one per decoder stage); otherwise logits at full resolution.
    """

    def __init__(self, topo: NetworkTopology, in_channels: int, num_classes: int):
        super().__init__()
        dim, feats, n = topo.dim, topo.features_per_stage, topo.n_conv_per_stage
        self.deep_supervision = topo.deep_supervision
        self.encoder = nn.ModuleList()
        cin = in_channels
        for s, blocks in enumerate(resenc_blocks_per_stage(topo.n_stages)):
            k, f = topo.kernel_sizes[s], feats[s]
            stage = [ResidualBlock(dim, cin, f, k, topo.strides[s])]
            stage += [ResidualBlock(dim, f, f, k) for _ in range(blocks - 1)]
            self.encoder.append(nn.Sequential(*stage))
            cin = f
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for s in range(topo.n_stages - 1, 0, -1):
            st = topo.strides[s]
            self.up.append(transp_conv_cls(dim)(feats[s], feats[s - 1], st, stride=st))
            self.decoder.append(
                StackedConvs(dim, 2 * feats[s - 1], feats[s - 1], topo.kernel_sizes[s - 1], [1] * dim, n)
            )
            self.heads.append(conv_cls(dim)(feats[s - 1], num_classes, 1))

    def forward(self, x: torch.Tensor):
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        outputs = []
        want_all = self.deep_supervision and self.training
        for i, (up, dec) in enumerate(zip(self.up, self.decoder)):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
            if want_all or i == len(self.decoder) - 1:
                outputs.append(self.heads[i](x))
        if want_all:
            return outputs[::-1]  # highest resolution first
        return outputs[-1]


@register("resenc")
def build_resenc(topo: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    return ResEncUNet(topo, in_channels, num_classes)
