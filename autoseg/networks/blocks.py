"""Building blocks: convolution → instance norm → leaky ReLU, in 2D or 3D."""

from __future__ import annotations

from torch import nn


def conv_cls(dim: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[dim]


def transp_conv_cls(dim: int) -> type[nn.Module]:
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim]


def norm_cls(dim: int) -> type[nn.Module]:
    return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dim]


def norm(dim: int, channels: int) -> nn.Module:
    """Affine instance norm (the norm of every block here)."""
    return norm_cls(dim)(channels, eps=1e-5, affine=True)


def same_padding(kernel: list[int], dilation: list[int] | int = 1) -> list[int]:
    """Padding that keeps the size of an odd ``kernel`` at ``dilation`` (per axis)."""
    dilation = [dilation] * len(kernel) if isinstance(dilation, int) else dilation
    return [(k // 2) * d for k, d in zip(kernel, dilation)]


class ConvNormAct(nn.Sequential):
    """Conv (padding keeps size, ``stride`` downsamples, ``dilation`` spreads the kernel) → InstanceNorm
    (affine) → LeakyReLU(0.01)."""

    def __init__(
        self,
        dim: int,
        cin: int,
        cout: int,
        kernel: list[int],
        stride: list[int] | int = 1,
        dilation: list[int] | int = 1,
    ):
        padding = same_padding(kernel, dilation)
        super().__init__(
            conv_cls(dim)(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=True),
            norm_cls(dim)(cout, eps=1e-5, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class StackedConvs(nn.Sequential):
    """``n`` ConvNormAct blocks; the first one carries the stride."""

    def __init__(self, dim: int, cin: int, cout: int, kernel: list[int], stride: list[int], n: int = 2):
        layers = [ConvNormAct(dim, cin, cout, kernel, stride)]
        layers += [ConvNormAct(dim, cout, cout, kernel, 1) for _ in range(n - 1)]
        super().__init__(*layers)


def network_outputs(logits: list, want_all: bool):
    """The forward contract of every architecture: ``logits`` highest resolution first (or, for heads at one
    resolution, the most complete first); all of them as a list when ``want_all`` (training with deep
    supervision), else the first alone as a tensor."""
    return list(logits) if want_all else logits[0]
