"""Blocks shared by the transformer networks (:mod:`.unetr`, :mod:`.transunet`, :mod:`.swin_unetr`).

- :class:`SelfAttention`: multi-head self-attention through
  ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels where the device has
  them; on the meta device, where the planner measures, the math path, which saves the ``tokens × tokens``
  attention weights per head: the planner's memory estimate is the quadratic one);
- :class:`TransformerBlock`: the pre-norm ViT block (LayerNorm → attention → residual, LayerNorm → MLP with
  GELU and ratio 4 → residual), as in ViT, UNETR and TransUNet;
- :func:`sincos_position_embedding`: fixed sine-cosine position codes of a token grid in 2D or 3D. The
  networks are built from a :class:`NetworkTopology`, which does not fix the patch size, so the position code
  is computed for the grid of the input at hand rather than learnt for one grid (the learnt embedding of
  UNETR's paper has ``tokens × hidden`` weights for one patch size);
- :class:`ResidualBlock` and :class:`UpBlock`: the convolutional decoder blocks of UNETR and Swin-UNETR
  (conv without bias → affine instance norm → LeakyReLU(0.01), twice, with a 1×1 projection when the width
  changes; transposed convolution with kernel = stride, concatenation with the skip, residual block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.networks.blocks import conv_cls, norm, same_padding, transp_conv_cls


def head_count(width: int, head_dim: int) -> int:
    """Heads of about ``head_dim`` channels each: the largest divisor of ``width`` not above
    ``max(1, width // head_dim)``."""
    heads = max(1, width // head_dim)
    while width % heads:
        heads -= 1
    return heads


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``x`` of shape ``(..., N, C)``; ``bias``, broadcastable to
    ``(..., heads, N, N)``, is added to the attention logits (relative positions, window masks)."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        *lead, n, c = x.shape
        qkv = self.qkv(x).reshape(-1, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, N, c / heads)
        if bias is not None and bias.dim() > 3:  # one bias per window: spelled out per batch element (ONNX's
            bias = bias.expand(*lead, self.heads, n, n).reshape(-1, self.heads, n, n)  # attention is 4D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(*lead, n, c))


def mlp(width: int, ratio: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, ratio * width), nn.GELU(), nn.Linear(ratio * width, width))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on tokens ``(B, N, C)``."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = mlp(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def sincos_position_embedding(grid: list[int], width: int, device, dtype=torch.float32) -> torch.Tensor:
    """Position codes ``(N, width)`` of the ``N = prod(grid)`` tokens of ``grid`` in row-major order: each axis
    gets ``2 * (width // (2 * len(grid)))`` channels, sines and cosines of the token's index along that axis
    at frequencies ``10000 ** (-i / half)`` (as MAE's 2D codes); the remaining channels are zero."""
    per_axis = width // (2 * len(grid))
    freq = 10000.0 ** (-torch.arange(per_axis, device=device, dtype=torch.float32) / max(per_axis, 1))
    coords = torch.meshgrid(
        *[torch.arange(g, device=device, dtype=torch.float32) for g in grid], indexing="ij"
    )
    parts = []
    for c in coords:
        angle = c.reshape(-1, 1) * freq[None]
        parts += [torch.sin(angle), torch.cos(angle)]
    codes = torch.cat(parts, dim=1)
    codes = F.pad(codes, (0, width - codes.shape[1]))
    return codes.to(dtype)


def tokens_to_grid(tokens: torch.Tensor, grid: list[int]) -> torch.Tensor:
    """``(B, N, C)`` tokens → ``(B, C, *grid)`` feature map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


class ResidualBlock(nn.Module):
    """``x → conv → norm → act → conv → norm (+ x, projected by a 1×1 conv and norm if the width changes) →
    act``; convolutions without bias (a norm follows each), padding keeps the size."""

    def __init__(self, dim: int, cin: int, cout: int, kernel: list[int]):
        super().__init__()
        conv, pad = conv_cls(dim), same_padding(kernel)
        self.conv1 = conv(cin, cout, kernel, padding=pad, bias=False)
        self.norm1 = norm(dim, cout)
        self.conv2 = conv(cout, cout, kernel, padding=pad, bias=False)
        self.norm2 = norm(dim, cout)
        self.project = (
            nn.Sequential(conv(cin, cout, 1, bias=False), norm(dim, cout)) if cin != cout else nn.Identity()
        )
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(y)) + self.project(x))


def transposed(dim: int, cin: int, cout: int, stride: list[int]) -> nn.Module:
    """Transposed convolution with kernel = ``stride`` (no bias): upsamples by ``stride``."""
    return transp_conv_cls(dim)(cin, cout, stride, stride=stride, bias=False)


class UpBlock(nn.Module):
    """``(coarse, skip) → ResidualBlock(cat(transposed(coarse), skip))``; ``skip`` has ``cout`` channels."""

    def __init__(self, dim: int, cin: int, cout: int, stride: list[int], kernel: list[int]):
        super().__init__()
        self.up = transposed(dim, cin, cout, stride)
        self.block = ResidualBlock(dim, 2 * cout, cout, kernel)

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(coarse), skip], dim=1))
