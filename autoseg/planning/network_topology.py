"""The shape of a network, as plans record it and every architecture builds from it.

:class:`NetworkTopology` sits below the network registry (:mod:`autoseg.networks`) and below the plans
(:mod:`autoseg.planning.plans`, which re-exports it): the architectures build from it, and the plans check a
topology against the registry (known architecture, parameter count) without importing anything above them.
It imports nothing from autoseg.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NetworkTopology:
    """What ``autoseg.networks.build_network`` needs. One entry per stage in each list."""

    architecture: str  # registry name, e.g. "unet"
    dim: int  # 2 or 3
    strides: list[list[int]]  # stride of the first conv of each stage; stage 0 is all ones
    kernel_sizes: list[list[int]]
    features_per_stage: list[int]
    n_conv_per_stage: int = 2
    deep_supervision: bool = True

    @property
    def n_stages(self) -> int:
        return len(self.strides)

    def total_stride(self) -> list[int]:
        out = [1] * self.dim
        for s in self.strides:
            out = [a * b for a, b in zip(out, s)]
        return out
