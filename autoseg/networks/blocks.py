"""Building blocks: convolution → instance norm → leaky ReLU, in 2D or 3D."""

from __future__ import annotations

from torch import nn


def conv_cls(dim: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[dim]


def transp_conv_cls(dim: int) -> type[nn.Module]:
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim]


def norm_cls(dim: int) -> type[nn.Module]:
    return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dim]


class ConvNormAct(nn.Sequential):
    """Conv (padding keeps size, ``stride`` downsamples) → InstanceNorm (affine) → LeakyReLU(0.01)."""

    def __init__(self, dim: int, cin: int, cout: int, kernel: list[int], stride: list[int] | int = 1):
        padding = [k // 2 for k in kernel]
        super().__init__(
            conv_cls(dim)(cin, cout, kernel, stride=stride, padding=padding, bias=True),
            norm_cls(dim)(cout, eps=1e-5, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class StackedConvs(nn.Sequential):
    """``n`` ConvNormAct blocks; the first one carries the stride."""

    def __init__(self, dim: int, cin: int, cout: int, kernel: list[int], stride: list[int], n: int = 2):
        layers = [ConvNormAct(dim, cin, cout, kernel, stride)]
        layers += [ConvNormAct(dim, cout, cout, kernel, 1) for _ in range(n - 1)]
        super().__init__(*layers)
