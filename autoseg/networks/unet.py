"""Plain-convolution U-Net built from a :class:`NetworkTopology` (2D or 3D, anisotropic strides/kernels)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from autoseg.networks.blocks import StackedConvs, conv_cls, transp_conv_cls
from autoseg.planning.network_topology import NetworkTopology


class UNet(nn.Module):
    """Encoder: one :class:`StackedConvs` per stage (strided first conv). Decoder: transposed conv with kernel =
    stride, concatenation with the skip, :class:`StackedConvs`; a 1×1 segmentation head per decoder stage.

    ``forward(x)`` with ``x`` of shape ``(B, C, *patch)``: with deep supervision in training mode, a list of
    logits ``(B, K, ...)`` highest resolution first (one per decoder stage); otherwise logits at full resolution.
    """

    def __init__(
        self,
        topo: NetworkTopology,
        in_channels: int,
        num_classes: int,
        encoder: nn.ModuleList | None = None,
        decoder_block: Callable[[int, int, list[int]], nn.Module] | None = None,
    ):
        """``encoder`` (one module per stage, stage ``s`` giving ``features_per_stage[s]`` channels at its
        stride) replaces the plain encoder; the residual-encoder U-Net is this class with such an encoder.
        ``decoder_block(cin, cout, kernel)`` replaces the decoder's :class:`StackedConvs` (stride 1)."""
        super().__init__()
        dim, feats, n = topo.dim, topo.features_per_stage, topo.n_conv_per_stage
        self.deep_supervision = topo.deep_supervision
        if encoder is None:
            encoder = nn.ModuleList()
            cin = in_channels
            for s in range(topo.n_stages):
                encoder.append(StackedConvs(dim, cin, feats[s], topo.kernel_sizes[s], topo.strides[s], n))
                cin = feats[s]
        self.encoder = encoder
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for s in range(topo.n_stages - 1, 0, -1):
            st = topo.strides[s]
            self.up.append(transp_conv_cls(dim)(feats[s], feats[s - 1], st, stride=st))
            k = topo.kernel_sizes[s - 1]
            self.decoder.append(
                decoder_block(2 * feats[s - 1], feats[s - 1], k)
                if decoder_block is not None
                else StackedConvs(dim, 2 * feats[s - 1], feats[s - 1], k, [1] * dim, n)
            )
            self.heads.append(conv_cls(dim)(feats[s - 1], num_classes, 1))

    def skip(self, i: int, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """What decoder stage ``i`` concatenates from the encoder: the skip itself (:mod:`.attention_unet`
        gates it with ``coarse``, the coarser decoder map)."""
        return skip

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """What the deepest encoder map becomes before the decoder: itself (:mod:`.transunet` runs a
        transformer over it)."""
        return x

    def forward(self, x: torch.Tensor):
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = self.bottleneck(skips.pop())
        outputs = []
        want_all = self.deep_supervision and self.training
        for i, (up, dec) in enumerate(zip(self.up, self.decoder)):
            x = dec(torch.cat([up(x), self.skip(i, skips.pop(), x)], dim=1))
            if want_all or i == len(self.decoder) - 1:
                outputs.append(self.heads[i](x))
        if want_all:
            return outputs[::-1]  # highest resolution first
        return outputs[-1]


def build_unet(topo: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    return UNet(topo, in_channels, num_classes)
