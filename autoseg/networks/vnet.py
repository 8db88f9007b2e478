"""V-Net (Milletari, Navab & Ahmadi, 2016) built from a :class:`NetworkTopology`, adapted to anisotropic
strides and to the topology's widths."""

from __future__ import annotations

import torch
from torch import nn

from autoseg.networks.blocks import conv_cls, norm_cls, transp_conv_cls
from autoseg.planning.network_topology import NetworkTopology

# convolutions per residual stage (Milletari et al. 2016: 1, 2, 3, 3, 3); decoder stages mirror them
CONVS_PER_STAGE = (1, 2, 3)
KERNEL = 5  # replaces every kernel entry > 1 of the topology; 1 (an axis still too coarse) stays 1


def vnet_convs_per_stage(n_stages: int) -> list[int]:
    """``[1, 2, 3, 3, ...]`` truncated or extended (with 3) to ``n_stages`` entries."""
    return [CONVS_PER_STAGE[min(s, len(CONVS_PER_STAGE) - 1)] for s in range(n_stages)]


def vnet_kernel(kernel: list[int]) -> list[int]:
    """The topology's kernel with every entry > 1 widened to ``KERNEL`` (``[1, 3, 3]`` -> ``[1, 5, 5]``)."""
    return [1 if k == 1 else KERNEL for k in kernel]


def _conv_norm(
    dim: int, cin: int, cout: int, kernel: list[int], stride: list[int] | int = 1
) -> list[nn.Module]:
    # (k - 1) // 2 keeps the size for odd kernels and is 0 for the kernel = stride down-convolutions
    padding = [(k - 1) // 2 for k in kernel]
    return [
        conv_cls(dim)(cin, cout, kernel, stride=stride, padding=padding, bias=True),
        norm_cls(dim)(cout, eps=1e-5, affine=True),
    ]


def conv_norm_prelu(
    dim: int, cin: int, cout: int, kernel: list[int], stride: list[int] | int = 1
) -> nn.Sequential:
    """Conv → affine instance norm → channel-wise PReLU."""
    return nn.Sequential(*_conv_norm(dim, cin, cout, kernel, stride), nn.PReLU(cout))


class ResidualConvs(nn.Module):
    """``n`` convolutions (each conv → norm → PReLU, the last without PReLU), then the residual is added and a
    PReLU applied: ``forward(x, residual) = PReLU(convs(x) + residual)``; ``residual`` has ``cout`` channels
    and the shape of the output."""

    def __init__(self, dim: int, cin: int, cout: int, kernel: list[int], n: int):
        super().__init__()
        layers = [conv_norm_prelu(dim, cin if i == 0 else cout, cout, kernel) for i in range(n - 1)]
        layers += _conv_norm(dim, cin if n == 1 else cout, cout, kernel)
        self.convs = nn.Sequential(*layers)
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.act(self.convs(x) + residual)


class VNet(nn.Module):
    """V-Net: residual stages of 5×5×5 (2D: 5×5) convolutions with PReLU, strided-convolution downsampling and
    transposed-convolution upsampling.

    Following the paper: stage ``s`` has 1, 2, 3, 3, ... convolutions (decoder stages mirror the encoder
    stage at their resolution); downsampling is a convolution with kernel = stride that changes the width;
    upsampling a transposed convolution with kernel = stride; the input of each stage is added to the output
    of its convolutions (stage 0: the input projected by a 1×1 convolution when its channel count differs,
    where the paper broadcasts its single channel).
    Adapted to :class:`NetworkTopology`:
    - kernels are 5 along every axis where the topology's kernel is > 1 and stay 1 where it is 1 (axes still
      too coarse to mix), strides (possibly anisotropic) and widths ``features_per_stage`` are the topology's;
      ``n_conv_per_stage`` is not used;
    - the decoder stage concatenates the upsampled map with the skip (2× features), its first convolution
      returns to 1× features and the upsampled map is the residual (the paper keeps 2× features throughout,
      which at widths up to 320 costs ~4× the decoder's parameters);
    - normalisation is affine instance norm after every convolution (the paper had none, later
      implementations batch norm; instance norm behaves with the batches of 2 that 3D patches allow);
    - one 1×1 segmentation head per decoder stage for deep supervision, as in the U-Net.

    ``forward(x)`` with ``x`` of shape ``(B, C, *patch)``: with deep supervision in training mode, a list of
    logits ``(B, K, ...)`` highest resolution first (one per decoder stage); otherwise logits at full resolution.
    """

    def __init__(self, topo: NetworkTopology, in_channels: int, num_classes: int):
        super().__init__()
        dim, feats = topo.dim, topo.features_per_stage
        convs = vnet_convs_per_stage(topo.n_stages)
        kernels = [vnet_kernel(k) for k in topo.kernel_sizes]
        self.deep_supervision = topo.deep_supervision
        f0 = feats[0]
        self.input_proj = (
            nn.Identity() if in_channels == f0 else conv_cls(dim)(in_channels, f0, 1, bias=False)
        )
        self.down = nn.ModuleList()  # stages 1..n-1
        self.encoder = nn.ModuleList([ResidualConvs(dim, in_channels, f0, kernels[0], convs[0])])
        for s in range(1, topo.n_stages):
            st = topo.strides[s]
            self.down.append(conv_norm_prelu(dim, feats[s - 1], feats[s], st, st))
            self.encoder.append(ResidualConvs(dim, feats[s], feats[s], kernels[s], convs[s]))
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for s in range(topo.n_stages - 1, 0, -1):
            st, f = topo.strides[s], feats[s - 1]
            self.up.append(
                nn.Sequential(
                    transp_conv_cls(dim)(feats[s], f, st, stride=st),
                    norm_cls(dim)(f, eps=1e-5, affine=True),
                    nn.PReLU(f),
                )
            )
            self.decoder.append(ResidualConvs(dim, 2 * f, f, kernels[s - 1], convs[s - 1]))
            self.heads.append(conv_cls(dim)(f, num_classes, 1))

    def forward(self, x: torch.Tensor):
        x = self.encoder[0](x, self.input_proj(x))
        skips = [x]
        for down, stage in zip(self.down, self.encoder[1:]):
            d = down(x)
            x = stage(d, d)
            skips.append(x)
        x = skips.pop()
        outputs = []
        want_all = self.deep_supervision and self.training
        for i, (up, dec) in enumerate(zip(self.up, self.decoder)):
            u = up(x)
            x = dec(torch.cat([u, skips.pop()], dim=1), u)
            if want_all or i == len(self.decoder) - 1:
                outputs.append(self.heads[i](x))
        if want_all:
            return outputs[::-1]  # highest resolution first
        return outputs[-1]


def build_vnet(topo: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    return VNet(topo, in_channels, num_classes)
