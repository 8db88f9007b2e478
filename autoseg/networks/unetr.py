"""UNETR (Hatamizadeh et al. 2022): a ViT encoder on non-overlapping patches whose intermediate layers feed a
convolutional decoder, built from a :class:`NetworkTopology` (2D or 3D, anisotropic strides/kernels).

What comes from the topology (one rule each, so that the planner's sizing by width works):

- **levels** ``L = min(4, n_stages - 1)``: the decoder works at the resolutions of stages ``0 .. L - 1`` of the
  topology (full, 1/2, 1/4, 1/8 for the paper's isotropic case), and the tokens are the stage-``L`` grid;
- **token size** per axis: the cumulative stride of stage ``L`` (16 per axis in the paper; smaller along an axis
  the planner pools less, e.g. the coarse axis of anisotropic data). The planner makes the patch divisible by the
  total stride, hence by the token size: no padding is needed;
- **ViT**: hidden width ``24 × features_per_stage[0]`` (768 at the planner's default 32, the paper's ViT-B),
  12 heads, 12 layers, MLP ratio 4, no bias on the query/key/value projection (as the paper's code);
- **skips**: the outputs of layers ``12·l/L`` for ``l = 1 .. L-1`` (3, 6, 9 for ``L = 4``) and the final
  normalised tokens; the tokens of layer ``12·l/L`` reach stage ``l`` through ``L - l`` transposed
  convolutions (kernel = stride of the stage they undo), each but the first followed by a residual block;
- **decoder widths** ``features_per_stage[l]`` at stage ``l`` (the paper's 16, 32, 64, 128 for feature size 16),
  residual blocks with the topology's kernel at that stage, and a residual stem on the input at full resolution.

Position codes are fixed sine-cosine ones, computed for the input's token grid (:mod:`.transformer`): the
topology does not fix the patch size. The paper's learnt embedding is the one difference in parameters from
MONAI's ``UNETR`` with ``norm_name=("instance", {"affine": True})`` (``tokens × hidden`` weights; checked in
``tests/networks/test_transformer_networks.py``). One output (no deep supervision). Trained by default with
:data:`RECIPE`.
"""

from __future__ import annotations

import torch
from torch import nn

from autoseg.networks.blocks import conv_cls, network_outputs
from autoseg.networks.transformer import (
    ResidualBlock,
    TransformerBlock,
    UpBlock,
    sincos_position_embedding,
    tokens_to_grid,
    transposed,
)
from autoseg.planning.network_topology import NetworkTopology

VIT_LAYERS = 12
VIT_HEADS = 12
HIDDEN_PER_BASE_FEATURE = 24
RECIPE = {
    "optimizer": "adamw",
    "initial_lr": 1e-4,
    "weight_decay": 1e-5,
    "schedule": "cosine",
    "warmup_fraction": 0.05,
}
"""Training defaults of the transformers (:data:`autoseg.networks.registry.RECIPES`): AdamW at 1e-4 with weight
decay 1e-5 (UNETR's paper), the rate rising linearly over the first 5 % of the run, then cosine decay. A
settings file or command-line option still wins."""


def cumulative_strides(topo: NetworkTopology) -> list[list[int]]:
    """Stride of each stage's grid relative to the input (stage 0: all ones)."""
    out, acc = [], [1] * topo.dim
    for s in topo.strides:
        acc = [a * b for a, b in zip(acc, s)]
        out.append(list(acc))
    return out


class UNETR(nn.Module):
    """``forward(x)``, ``x`` of shape ``(B, C, *patch)`` with ``patch`` divisible by :attr:`token_size`: logits
    ``(B, K, *patch)`` (a one-element list in training mode with deep supervision)."""

    cost_affine_in_voxels = False  # global attention: memory and FLOPs grow with the square of the tokens

    def __init__(self, topo: NetworkTopology, in_channels: int, num_classes: int):
        super().__init__()
        if topo.n_stages < 2:
            raise ValueError("unetr needs a topology of at least 2 stages")
        dim, feats, strides, kernels = topo.dim, topo.features_per_stage, topo.strides, topo.kernel_sizes
        levels = min(4, topo.n_stages - 1)
        self.deep_supervision = topo.deep_supervision
        self.token_size = cumulative_strides(topo)[levels]
        self.hidden = HIDDEN_PER_BASE_FEATURE * feats[0]
        self.embed = conv_cls(dim)(in_channels, self.hidden, self.token_size, stride=self.token_size)
        self.blocks = nn.ModuleList(
            TransformerBlock(self.hidden, VIT_HEADS, qkv_bias=False) for _ in range(VIT_LAYERS)
        )
        self.norm = nn.LayerNorm(self.hidden)
        self.skip_layers = [VIT_LAYERS * lvl // levels for lvl in range(1, levels)]
        self.stem = ResidualBlock(dim, in_channels, feats[0], kernels[0])
        self.skip_paths = nn.ModuleList()
        for lvl in range(1, levels):
            path = [transposed(dim, self.hidden, feats[lvl], strides[levels])]
            for j in range(levels - 1, lvl, -1):  # from stage j to stage j - 1
                path += [transposed(dim, feats[lvl], feats[lvl], strides[j])]
                path += [ResidualBlock(dim, feats[lvl], feats[lvl], kernels[j - 1])]
            self.skip_paths.append(nn.Sequential(*path))
        self.up = nn.ModuleList(
            UpBlock(
                dim,
                self.hidden if lvl == levels - 1 else feats[lvl + 1],
                feats[lvl],
                strides[lvl + 1],
                kernels[lvl],
            )
            for lvl in range(levels - 1, -1, -1)
        )
        self.head = conv_cls(dim)(feats[0], num_classes, 1)

    def encode(self, x: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
        """(token grid, [tokens of each skip layer ..., final normalised tokens])."""
        grid = [s // t for s, t in zip(x.shape[2:], self.token_size)]
        if any(s % t for s, t in zip(x.shape[2:], self.token_size)):
            raise ValueError(
                f"unetr input {list(x.shape[2:])} is not divisible by its token size {self.token_size}"
            )
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = tokens + sincos_position_embedding(grid, self.hidden, x.device, tokens.dtype)
        kept = []
        for i, block in enumerate(self.blocks, start=1):
            tokens = block(tokens)
            if i in self.skip_layers:
                kept.append(tokens)
        return grid, [*kept, self.norm(tokens)]

    def forward(self, x: torch.Tensor):
        grid, states = self.encode(x)
        skips = [self.stem(x)] + [path(tokens_to_grid(t, grid)) for path, t in zip(self.skip_paths, states)]
        y = tokens_to_grid(states[-1], grid)
        for up, skip in zip(self.up, reversed(skips)):
            y = up(y, skip)
        return network_outputs([self.head(y)], self.deep_supervision and self.training)


def build_unetr(topo: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    return UNETR(topo, in_channels, num_classes)
