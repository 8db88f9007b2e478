"""Network registry shared by planning, training and inference.

``ARCHITECTURES`` maps a name to a builder ``(topology, in_channels, num_classes) -> nn.Module``: a plain dict,
filled here and nowhere else at import time. ``build_network(topology, in_channels, num_classes)`` returns a
module whose forward gives, in training mode with deep supervision, a list of logits highest resolution first;
in eval mode, the full-resolution logits.

Adding an architecture is one entry in ``ARCHITECTURES`` (or ``ARCHITECTURES[name] = builder`` from outside,
as ``tests/networks/test_new_architecture.py`` does): the planner measures the network it builds
(:mod:`autoseg.networks.measure`), so nothing in ``autoseg/planning`` describes it a second time.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from autoseg.networks.resenc import build_resenc
from autoseg.networks.unet import build_unet
from autoseg.networks.vnet import build_vnet
from autoseg.planning.plans import NetworkTopology

Builder = Callable[[NetworkTopology, int, int], nn.Module]

ARCHITECTURES: dict[str, Builder] = {"unet": build_unet, "resenc": build_resenc, "vnet": build_vnet}


def available() -> list[str]:
    return sorted(ARCHITECTURES)


def build_network(topology: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    if topology.architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {topology.architecture!r} (available: {', '.join(available())})"
        )
    return ARCHITECTURES[topology.architecture](topology, in_channels, num_classes)
