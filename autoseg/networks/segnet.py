"""SegNet (Badrinarayanan, Kendall & Cipolla 2017) built from a :class:`NetworkTopology` (2D or 3D,
anisotropic pooling per stage): the decoder upsamples with max-unpooling at the encoder's stored pooling
indices, with no skip concatenation."""

from __future__ import annotations

import math

import torch
from torch import nn

from autoseg.networks.blocks import StackedConvs, conv_cls, network_outputs
from autoseg.planning.network_topology import NetworkTopology


def _pool(dim: int, stride: list[int]) -> nn.Module:
    return {2: nn.MaxPool2d, 3: nn.MaxPool3d}[dim](stride, stride, return_indices=True)


def max_unpool(x: torch.Tensor, indices: torch.Tensor, stride: list[int]) -> torch.Tensor:
    """Max-unpooling (kernel = stride, no padding): each value of ``x`` ``(B, C, *grid)`` goes to the position
    ``indices`` (as :class:`torch.nn.MaxPool3d` ``return_indices=True`` gives them: flat within each sample's
    channel) names on the ``stride`` times finer grid, zeros elsewhere. What ``nn.MaxUnpool3d`` computes, as a
    scatter, which ``torch.jit.trace`` and the ONNX exporter both take (``nn.MaxUnpool3d`` fails to trace)."""
    b, c = x.shape[0], x.shape[1]
    size = [n * st for n, st in zip(x.shape[2:], stride)]
    out = x.new_zeros((b, c, math.prod(size)))
    return out.scatter(2, indices.flatten(2), x.flatten(2)).view(b, c, *size)


class SegNet(nn.Module):
    """Encoder stage ``s``: max pooling (kernel = stride = the topology's stride ``s``, anisotropic where the
    topology is; stage 0 does not pool), which keeps the indices of the maxima, then :class:`StackedConvs`
    (stride 1) to width ``features_per_stage[s]``.

    Decoder, from the coarsest stage up: at stage ``s`` :class:`StackedConvs` from width ``f[s]`` to
    ``f[s - 1]`` (the paper's decoder block, whose last convolution narrows to the next block's width), then
    max-unpooling with stage ``s``'s indices (each value goes back to the position its maximum came from, the
    rest of the window is zero) to stage ``s - 1``'s grid; at full resolution one more :class:`StackedConvs`
    and a 1×1 head. No skip features are concatenated: only the indices cross from encoder to decoder.

    No natural deep supervision: in training mode with deep supervision the full-resolution logits come as a
    one-element list; otherwise as a tensor.
    """

    def __init__(self, topo: NetworkTopology, in_channels: int, num_classes: int):
        super().__init__()
        dim, feats, n, kernels = topo.dim, topo.features_per_stage, topo.n_conv_per_stage, topo.kernel_sizes
        self.deep_supervision = topo.deep_supervision
        one = [1] * dim
        self.pools = nn.ModuleList(_pool(dim, topo.strides[s]) for s in range(1, topo.n_stages))
        self.unpool_strides = [list(topo.strides[s]) for s in range(topo.n_stages - 1, 0, -1)]
        self.encoder = nn.ModuleList()
        cin = in_channels
        for s in range(topo.n_stages):
            self.encoder.append(StackedConvs(dim, cin, feats[s], kernels[s], one, n))
            cin = feats[s]
        self.decoder = nn.ModuleList(
            StackedConvs(dim, feats[s], feats[s - 1], kernels[s], one, n)
            for s in range(topo.n_stages - 1, 0, -1)
        )
        self.last = StackedConvs(dim, feats[0], feats[0], kernels[0], one, n)
        self.head = conv_cls(dim)(feats[0], num_classes, 1)

    def forward(self, x: torch.Tensor):
        x = self.encoder[0](x)
        indices = []
        for pool, stage in zip(self.pools, self.encoder[1:]):
            x, idx = pool(x)
            indices.append(idx)
            x = stage(x)
        for dec, stride in zip(self.decoder, self.unpool_strides):
            x = max_unpool(dec(x), indices.pop(), stride)
        logits = self.head(self.last(x))
        return network_outputs([logits], self.deep_supervision and self.training)


def build_segnet(topo: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    return SegNet(topo, in_channels, num_classes)
