"""Swin-UNETR (Hatamizadeh et al. 2022) built from a :class:`NetworkTopology` (2D or 3D, anisotropic strides):
a shifted-window transformer encoder and a convolutional decoder with skips.

What comes from the topology (``S = n_stages - 2`` transformer stages; the paper's 4 at 6 stages):

- **patch embedding**: a convolution with kernel = stride = ``strides[1]`` (2 per axis in the paper) to
  ``C = features_per_stage[0]`` channels (the paper's feature size, 48; MONAI's default 24);
- **stage** ``i`` (``i = 0 .. S-1``) at width ``C·2^i``: ``n_conv_per_stage`` Swin blocks (2 by default, the paper's
  depths 2, 2, 2, 2), heads of about 16 channels (:func:`.transformer.head_count`: 3, 6, 12, 24 at ``C = 48``),
  then patch merging by ``strides[i + 2]`` (the neighbours of each merged voxel concatenated, LayerNorm, linear
  map to ``2·C·2^i`` without bias);
- **windows**: per axis and per stage, ``min(7, feature-map size)`` (the paper's 7; an axis that fits in one
  window gets no shift); blocks alternate unshifted and shifted windows (shift = window // 2 along the axes
  larger than a window, with the attention mask that keeps the wrapped-around regions apart). A map not
  divisible by its window is zero-padded at the end of each axis inside the block and cropped back (as the
  paper's code): any patch divisible by the topology's total stride works, and the planner's patch is.
  The relative position bias table is sized for windows of 7 (``13^d × heads`` weights per block), and a
  smaller window indexes the part of it its offsets reach;
- **decoder** (as the paper's code): residual blocks on the input (stem), on the normalised patch embedding and
  on the normalised outputs of stages ``0 .. S-3``, not on that of stage ``S-2``, and on the deepest one
  (``16·C`` channels at 4 stages); then up blocks (transposed convolution with kernel = stride, concatenation,
  residual block) down to full resolution with widths ``C, C, 2C, 4C, 8C`` at stages ``0 .. 4``.

Each stage's output is normalised by a LayerNorm without weights before the decoder takes it (MONAI's
``normalize=True``). With ``norm_name=("instance", {"affine": True})`` MONAI's ``SwinUNETR`` has exactly this
network's parameters (checked in ``tests/networks/test_transformer_networks.py``). One output (no deep
supervision).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.errors import AutosegError
from autoseg.networks.blocks import conv_cls, network_outputs
from autoseg.networks.transformer import ResidualBlock, SelfAttention, UpBlock, head_count, mlp
from autoseg.networks.unetr import RECIPE as UNETR_RECIPE
from autoseg.planning.network_topology import NetworkTopology

RECIPE = dict(UNETR_RECIPE)
"""Training defaults: AdamW with warmup and cosine decay (:data:`.unetr.RECIPE`; the paper used AdamW with
cosine decay and warmup too, at a rate of 8e-4 for BraTS)."""

WINDOW = 7
HEAD_WIDTH = 16
MASKED = -100.0  # added to the logits of token pairs from different regions of a shifted window


def window_partition(x: torch.Tensor, window: list[int]) -> torch.Tensor:
    """``(B, *sizes, C)`` with sizes divisible by ``window`` → ``(B, windows, prod(window), C)``."""
    b, *sizes, c = x.shape
    d = len(sizes)
    split = [b] + [v for s, w in zip(sizes, window) for v in (s // w, w)] + [c]
    order = [0] + [1 + 2 * a for a in range(d)] + [2 + 2 * a for a in range(d)] + [1 + 2 * d]
    return x.reshape(split).permute(order).reshape(b, -1, math.prod(window), c)


def window_merge(windows: torch.Tensor, window: list[int], sizes: list[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B, windows, prod(window), C)`` → ``(B, *sizes, C)``."""
    b, c, d = windows.shape[0], windows.shape[-1], len(sizes)
    counts = [s // w for s, w in zip(sizes, window)]
    x = windows.reshape(b, *counts, *window, c)
    order = [0] + [v for a in range(d) for v in (1 + a, 1 + d + a)] + [1 + 2 * d]
    return x.permute(order).reshape(b, *sizes, c)


def shifted_window_mask(sizes: list[int], window: list[int], shift: list[int], device) -> torch.Tensor:
    """``(windows, n, n)`` additive mask: 0 between tokens of the same region of the cyclically shifted map,
    :data:`MASKED` otherwise. Along each shifted axis the regions are ``[0, s-w)``, ``[s-w, s-shift)`` and
    ``[s-shift, s)`` (the last one wrapped around from the start)."""
    region = torch.zeros(sizes, device=device, dtype=torch.long)
    for a, (s, w, sh) in enumerate(zip(sizes, window, shift)):
        pos = torch.arange(s, device=device)
        ids = (pos >= s - w).long() + (pos >= s - sh).long() if sh else torch.zeros_like(pos)
        region = region * 3 + ids.reshape([-1 if b == a else 1 for b in range(len(sizes))])
    windows = window_partition(region[None, ..., None], window)[0, ..., 0]  # (windows, n)
    same = windows[:, :, None] == windows[:, None, :]
    return torch.where(same, 0.0, MASKED)


def relative_position_index(window: list[int], table_window: list[int], device) -> torch.Tensor:
    """``(n, n)`` row of each token pair's offset in a bias table for windows of ``table_window``
    (``prod(2·W - 1)`` rows, last axis fastest); ``window`` (per axis at most ``table_window``)."""
    grids = torch.meshgrid(*[torch.arange(w, device=device) for w in window], indexing="ij")
    coords = torch.stack([g.reshape(-1) for g in grids], dim=1)  # (n, d)
    offset = coords[:, None, :] - coords[None, :, :] + torch.tensor(table_window, device=device) - 1
    index = torch.zeros(offset.shape[:2], dtype=torch.long, device=device)
    for a, w in enumerate(table_window):
        index = index * (2 * w - 1) + offset[..., a]
    return index


class SwinBlock(nn.Module):
    """One Swin transformer block on ``(B, *sizes, C)`` (channels last), windows of at most ``table_window``."""

    def __init__(self, dim: int, width: int, heads: int, shifted: bool):
        super().__init__()
        self.table_window = [WINDOW] * dim
        self.shifted = shifted
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.bias_table = nn.Parameter(torch.zeros(math.prod(2 * w - 1 for w in self.table_window), heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = mlp(width)

    def windows(self, sizes: list[int]) -> tuple[list[int], list[int]]:
        """(window, shift) per axis for a map of ``sizes``: a window of at most 7, no shift along an axis that
        fits in one window."""
        window = [min(w, s) for w, s in zip(self.table_window, sizes)]
        shift = [w // 2 if self.shifted and s > w else 0 for w, s in zip(window, sizes)]
        return window, shift

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        sizes = list(x.shape[1:-1])
        window, shift = self.windows(sizes)
        pad = [(-s) % w for s, w in zip(sizes, window)]
        if any(pad):
            x = F.pad(x, [0, 0] + [v for p in reversed(pad) for v in (0, p)])
        padded = list(x.shape[1:-1])
        dims = list(range(1, len(sizes) + 1))
        if any(shift):
            x = torch.roll(x, [-s for s in shift], dims)
        n = math.prod(window)
        index = relative_position_index(window, self.table_window, x.device)
        bias = self.bias_table[index.reshape(-1)].reshape(n, n, self.heads).permute(2, 0, 1)  # (heads, n, n)
        if any(shift):
            bias = bias[None] + shifted_window_mask(padded, window, shift, x.device)[:, None].to(bias.dtype)
        out = window_merge(self.attn(window_partition(x, window), bias.to(x.dtype)), window, padded)
        if any(shift):
            out = torch.roll(out, shift, dims)
        return out[(slice(None), *[slice(0, s) for s in sizes])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """``(B, *sizes, C)`` → ``(B, *sizes / stride, 2C)``: the ``prod(stride)`` voxels of each block concatenated,
    LayerNorm, linear map without bias."""

    def __init__(self, width: int, stride: list[int]):
        super().__init__()
        self.stride = list(stride)
        merged = math.prod(stride) * width
        self.norm = nn.LayerNorm(merged)
        self.reduce = nn.Linear(merged, 2 * width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = list(x.shape[1:-1])
        blocks = window_partition(x, self.stride)  # (B, blocks, prod(stride), C)
        coarse = [s // st for s, st in zip(sizes, self.stride)]
        merged = blocks.reshape(x.shape[0], *coarse, -1)
        return self.reduce(self.norm(merged))


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without weights over the channels of a channels-last map."""
    return F.layer_norm(x, x.shape[-1:])


def channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(-1, 1)


class SwinUNETR(nn.Module):
    """``forward(x)``, ``x`` of shape ``(B, C, *patch)`` with ``patch`` divisible by the total stride: logits
    ``(B, K, *patch)`` (a one-element list in training mode with deep supervision)."""

    cost_affine_in_voxels = False  # windows adapt to the map size: measure at the patch itself

    def __init__(self, topo: NetworkTopology, in_channels: int, num_classes: int):
        super().__init__()
        if topo.n_stages < 3:
            raise AutosegError(
                f"swin_unetr needs a topology of at least 3 stages (patch embedding and one Swin stage), got "
                f"{topo.n_stages}: the images are too small to pool twice; use another architecture"
            )
        dim, strides, kernels, c = topo.dim, topo.strides, topo.kernel_sizes, topo.features_per_stage[0]
        n = topo.n_stages - 2
        self.deep_supervision = topo.deep_supervision
        self.embed = conv_cls(dim)(in_channels, c, strides[1], stride=strides[1])
        self.stages = nn.ModuleList()
        for i in range(n):
            width = c * 2**i
            heads = head_count(width, HEAD_WIDTH)
            blocks = [SwinBlock(dim, width, heads, shifted=b % 2 == 1) for b in range(topo.n_conv_per_stage)]
            self.stages.append(nn.Sequential(*blocks, PatchMerging(width, strides[i + 2])))
        # decoder width at stage l: c at stages 0 and 1, c * 2**(l - 1) deeper, c * 2**n at the bottleneck
        widths = [c] + [c * 2 ** (lvl - 1) for lvl in range(1, n + 1)] + [c * 2**n]
        self.stem = ResidualBlock(dim, in_channels, c, kernels[0])
        self.encoders = nn.ModuleDict(
            {str(lvl): ResidualBlock(dim, widths[lvl], widths[lvl], kernels[lvl]) for lvl in range(1, n)}
        )
        self.encoders[str(n + 1)] = ResidualBlock(dim, widths[n + 1], widths[n + 1], kernels[n + 1])
        self.up = nn.ModuleList(
            UpBlock(dim, widths[lvl + 1], widths[lvl], strides[lvl + 1], kernels[lvl])
            for lvl in range(n, -1, -1)
        )
        self.head = conv_cls(dim)(c, num_classes, 1)

    def forward(self, x: torch.Tensor):
        y = self.embed(x).movedim(1, -1)  # channels last from here to the decoder
        states = [layer_norm(y)]
        for stage in self.stages:
            y = stage(y)
            states.append(layer_norm(y))
        feats = [self.stem(x)]
        for lvl, state in enumerate(states, start=1):
            state = channels_first(state)
            feats.append(self.encoders[str(lvl)](state) if str(lvl) in self.encoders else state)
        y = feats.pop()
        for up in self.up:
            y = up(y, feats.pop())
        return network_outputs([self.head(y)], self.deep_supervision and self.training)


def build_swin_unetr(topo: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    return SwinUNETR(topo, in_channels, num_classes)
