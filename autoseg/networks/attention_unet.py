"""Attention U-Net (Oktay et al. 2018) built from a :class:`NetworkTopology` (2D or 3D, anisotropic
strides/kernels): the plain U-Net with an additive attention gate on every skip connection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.networks.blocks import conv_cls, norm
from autoseg.networks.unet import UNet
from autoseg.planning.network_topology import NetworkTopology


class AttentionGate(nn.Module):
    """Additive attention gate: ``alpha = sigmoid(psi(relu(W_x(x) + W_g(g))))``, returns ``x * alpha``.

    ``x`` is the skip (``f_l`` channels), ``g`` the gating signal (``f_g`` channels) from the coarser decoder
    stage, ``stride`` times coarser than ``x`` along each axis. As in the paper, ``W_x`` brings ``x`` down to
    ``g``'s grid (a convolution with kernel = stride), ``W_g`` is 1×1, the coefficients
    ``alpha`` (one channel) are resampled back to ``x``'s grid (linear interpolation). Each of ``W_x``, ``W_g``
    and ``psi`` is followed by an affine instance norm (as MONAI's ``AttentionBlock`` has batch norms: the same
    parameter count at stride 1, which ``tests/networks`` checks).
    """

    def __init__(self, dim: int, f_g: int, f_l: int, f_int: int, stride: list[int] | None = None):
        super().__init__()
        stride = list(stride) if stride is not None else [1] * dim
        conv = conv_cls(dim)
        self.stride = stride
        self.mode = {2: "bilinear", 3: "trilinear"}[dim]
        self.w_x = nn.Sequential(conv(f_l, f_int, stride, stride=stride, bias=True), norm(dim, f_int))
        self.w_g = nn.Sequential(conv(f_g, f_int, 1, bias=True), norm(dim, f_int))
        self.psi = nn.Sequential(conv(f_int, 1, 1, bias=True), norm(dim, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        alpha = self.psi(torch.relu(self.w_x(x) + self.w_g(g)))
        if any(s != 1 for s in self.stride):
            alpha = F.interpolate(
                alpha, scale_factor=[float(s) for s in self.stride], mode=self.mode, align_corners=False
            )
        return x * alpha


class AttentionUNet(UNet):
    """:class:`UNet` whose decoder stage ``s`` concatenates the upsampled coarser map with the skip of stage
    ``s - 1`` multiplied by its attention coefficients, gated by the coarser decoder map (before its
    upsampling). Intermediate gate width: half the skip's width (at least 1). Deep supervision as U-Net.
    """

    def __init__(self, topo: NetworkTopology, in_channels: int, num_classes: int):
        super().__init__(topo, in_channels, num_classes)
        feats = topo.features_per_stage
        self.gates = nn.ModuleList(
            AttentionGate(topo.dim, feats[s], feats[s - 1], max(feats[s - 1] // 2, 1), topo.strides[s])
            for s in range(topo.n_stages - 1, 0, -1)
        )

    def skip(self, i: int, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        return self.gates[i](skip, coarse)


def build_attention_unet(topo: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    return AttentionUNet(topo, in_channels, num_classes)
