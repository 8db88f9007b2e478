"""DeepLabv3+-style network (Chen et al. 2018) built from a :class:`NetworkTopology` (2D or 3D, anisotropic
strides/kernels): a residual encoder whose last stages trade striding for atrous (dilated) convolutions,
Atrous Spatial Pyramid Pooling with image-level pooling, and the light decoder fusing one low-level skip."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.networks.blocks import ConvNormAct, conv_cls, network_outputs
from autoseg.networks.resenc import ResidualBlock
from autoseg.planning.network_topology import NetworkTopology

OUTPUT_STRIDE = 8  # the encoder's stride per axis is capped at this (the paper's denser setting)
BLOCKS_PER_STAGE = (1, 2)  # residual blocks per encoder stage (ResNet-18-like), later stages repeat the last
ASPP_RATES = (3, 6, 9)  # atrous rates along the most-strided axes, for feature maps ~16-24 voxels wide
ASPP_CHANNELS = 256  # at most: the ASPP and decoder width (the paper's), capped at the deepest stage's width
LOW_LEVEL_STRIDE = 4  # the skip comes from the deepest stage whose stride is at most this along every axis


@dataclass(frozen=True)
class AtrousPlan:
    """Per stage: the stride kept (``strides``) and the dilation of its convolutions (``dilations``), per
    axis; ``grid``: the cumulative stride of each stage's output after the change."""

    strides: list[list[int]]
    dilations: list[list[int]]
    grid: list[list[int]]


def atrous_plan(topo: NetworkTopology, output_stride: int = OUTPUT_STRIDE) -> AtrousPlan:
    """Along each axis, a stage keeps its stride while the cumulative stride stays within ``output_stride``;
    past it the stride becomes 1 and the dilation of that stage and the later ones is multiplied by it (as the
    paper's atrous ResNet), so the receptive field grows as if it had strided."""
    strides, dilations, grid = [], [], []
    cum, dil = [1] * topo.dim, [1] * topo.dim
    for stride in topo.strides:
        kept = [s if c * s <= output_stride else 1 for s, c in zip(stride, cum)]
        dil = [d * (s // k) for d, s, k in zip(dil, stride, kept)]
        cum = [c * k for c, k in zip(cum, kept)]
        strides.append(kept)
        dilations.append(dil)
        grid.append(cum)
    return AtrousPlan(strides, dilations, grid)


def aspp_rates(topo: NetworkTopology, kernel: list[int], rate: int) -> list[int]:
    """``rate`` along the axes the topology strides most, scaled down along axes it strides less (an axis is
    strided less because its voxels are coarser: ``rate × total_stride[axis] / max total_stride``, at least
    1), 1 along axes the kernel does not extend (kernel 1)."""
    total = topo.total_stride()
    return [1 if k == 1 else max(1, round(rate * t / max(total))) for k, t in zip(kernel, total)]


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling: a 1×1 branch, one atrous branch per rate (kernel 3 where the deepest
    stage's kernel extends, rates per axis from :func:`aspp_rates`), and image-level pooling (global mean,
    1×1 convolution, ReLU, broadcast back to the grid); all concatenated and projected by a 1×1 convolution.
    Every branch except the image pooling is conv → instance norm → leaky ReLU (a norm is undefined on one
    voxel)."""

    def __init__(self, topo: NetworkTopology, cin: int, cout: int):
        super().__init__()
        dim, kernel = topo.dim, topo.kernel_sizes[-1]
        self.axes = tuple(range(2, 2 + dim))
        branches = [ConvNormAct(dim, cin, cout, [1] * dim)]
        for rate in ASPP_RATES:
            branches.append(ConvNormAct(dim, cin, cout, kernel, 1, aspp_rates(topo, kernel, rate)))
        self.branches = nn.ModuleList(branches)
        self.image_pool = nn.Sequential(conv_cls(dim)(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = ConvNormAct(dim, (len(branches) + 1) * cout, cout, [1] * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(x.mean(dim=self.axes, keepdim=True))
        outs = [branch(x) for branch in self.branches]
        outs.append(pooled.expand(-1, -1, *x.shape[2:]))
        return self.project(torch.cat(outs, dim=1))


def atrous_encoder(topo: NetworkTopology, in_channels: int, plan: AtrousPlan) -> nn.ModuleList:
    """Residual stages (:class:`ResidualBlock`, 1 then 2 per stage), strides and dilations from ``plan``."""
    stages = nn.ModuleList()
    cin = in_channels
    for s in range(topo.n_stages):
        k, f, d = topo.kernel_sizes[s], topo.features_per_stage[s], plan.dilations[s]
        blocks = BLOCKS_PER_STAGE[min(s, len(BLOCKS_PER_STAGE) - 1)]
        stage = [ResidualBlock(topo.dim, cin, f, k, plan.strides[s], d)]
        stage += [ResidualBlock(topo.dim, f, f, k, 1, d) for _ in range(blocks - 1)]
        stages.append(nn.Sequential(*stage))
        cin = f
    return stages


def _resize(x: torch.Tensor, factor: list[int], mode: str) -> torch.Tensor:
    if all(f == 1 for f in factor):
        return x
    return F.interpolate(x, scale_factor=[float(f) for f in factor], mode=mode, align_corners=False)


class DeepLabV3Plus(nn.Module):
    """Encoder: :func:`atrous_encoder` (output stride ``output_stride`` per axis, :func:`atrous_plan`), then
    :class:`ASPP` on the deepest stage. Decoder (v3+): the ASPP output is upsampled (linear interpolation) to
    the grid of the low-level stage (the deepest with stride <= 4 along every axis, before the last) and
    concatenated with that stage's features reduced by a 1×1 convolution to 3/16 of the ASPP width (48 of 256
    in the paper); two convolutions (the low-level stage's kernel), a 1×1 classifier, and a linear upsampling
    to full resolution.

    No natural deep supervision: in training mode with deep supervision the full-resolution logits come as a
    one-element list; otherwise as a tensor.
    """

    def __init__(
        self, topo: NetworkTopology, in_channels: int, num_classes: int, output_stride: int = OUTPUT_STRIDE
    ):
        super().__init__()
        dim, feats = topo.dim, topo.features_per_stage
        self.deep_supervision = topo.deep_supervision
        self.mode = {2: "bilinear", 3: "trilinear"}[dim]
        plan = atrous_plan(topo, output_stride)
        self.encoder = atrous_encoder(topo, in_channels, plan)
        width = min(ASPP_CHANNELS, feats[-1])
        self.aspp = ASPP(topo, feats[-1], width)
        lows = [s for s in range(topo.n_stages - 1) if max(plan.grid[s]) <= LOW_LEVEL_STRIDE]
        self.low = lows[-1] if lows else 0
        low_width = max(width * 3 // 16, 1)
        self.reduce = ConvNormAct(dim, feats[self.low], low_width, [1] * dim)
        k = topo.kernel_sizes[self.low]
        self.fuse = nn.Sequential(
            ConvNormAct(dim, width + low_width, width, k), ConvNormAct(dim, width, width, k)
        )
        self.classifier = conv_cls(dim)(width, num_classes, 1)
        self.up_to_low = [a // b for a, b in zip(plan.grid[-1], plan.grid[self.low])]
        self.up_to_full = list(plan.grid[self.low])

    def forward(self, x: torch.Tensor):
        low = None
        for s, stage in enumerate(self.encoder):
            x = stage(x)
            if s == self.low:
                low = x
        x = _resize(self.aspp(x), self.up_to_low, self.mode)
        x = self.fuse(torch.cat([x, self.reduce(low)], dim=1))
        logits = _resize(self.classifier(x), self.up_to_full, self.mode)
        return network_outputs([logits], self.deep_supervision and self.training)


def build_deeplabv3plus(topo: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    return DeepLabV3Plus(topo, in_channels, num_classes)


def output_grid(topo: NetworkTopology, output_stride: int = OUTPUT_STRIDE) -> list[int]:
    """The encoder's stride per axis after the atrous change (at most ``output_stride``)."""
    return [math.prod(s[a] for s in atrous_plan(topo, output_stride).strides) for a in range(topo.dim)]
