"""Network registry shared by training and inference.

``build_network(topology, in_channels, num_classes)`` returns a module whose forward gives, in training mode
with deep supervision, a list of logits highest resolution first; in eval mode, the full-resolution logits.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from autoseg.planning.plans import NetworkTopology

_REGISTRY: dict[str, Callable[[NetworkTopology, int, int], nn.Module]] = {}


def register(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def build_network(topology: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    if topology.architecture not in _REGISTRY:
        raise ValueError(
            f"unknown architecture {topology.architecture!r} (available: {', '.join(available())})"
        )
    return _REGISTRY[topology.architecture](topology, in_channels, num_classes)


from autoseg.networks import resenc as _resenc  # noqa: E402,F401  (registers "resenc")
from autoseg.networks import unet as _unet  # noqa: E402,F401  (registers "unet")
from autoseg.networks import vnet as _vnet  # noqa: E402,F401  (registers "vnet")
