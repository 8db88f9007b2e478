"""The architecture registry: a name -> builder dict, and what is asked of a registered network.

``ARCHITECTURES`` maps a name to a builder ``(topology, in_channels, num_classes) -> nn.Module``: a plain dict,
filled here from the architecture modules and nowhere else at import time. ``build_network(topology,
in_channels, num_classes)`` returns a module whose forward gives, in training mode with deep supervision, a
list of logits highest resolution first; in eval mode, the full-resolution logits.

Adding an architecture is one entry in ``ARCHITECTURES`` (or ``ARCHITECTURES[name] = builder`` from outside,
as ``tests/networks/test_new_architecture.py`` does): the planner measures the network it builds
(:mod:`autoseg.networks.measure`), so nothing in ``autoseg/planning`` describes it a second time. The plans
check an untrusted topology against this registry (:func:`registered_builder`, :func:`network_parameters`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from autoseg.networks.attention_unet import build_attention_unet
from autoseg.networks.deeplabv3plus import build_deeplabv3plus
from autoseg.networks.fcn8s import build_fcn8s
from autoseg.networks.measure import count_parameters, on_meta
from autoseg.networks.resenc import build_resenc
from autoseg.networks.resse_unet import build_resse_unet
from autoseg.networks.segnet import build_segnet
from autoseg.networks.swin_unetr import RECIPE as SWIN_UNETR_RECIPE
from autoseg.networks.swin_unetr import build_swin_unetr
from autoseg.networks.transunet import RECIPE as TRANSUNET_RECIPE
from autoseg.networks.transunet import build_transunet
from autoseg.networks.unet import build_unet
from autoseg.networks.unetpp import build_unetpp
from autoseg.networks.unetr import RECIPE as UNETR_RECIPE
from autoseg.networks.unetr import build_unetr
from autoseg.networks.vnet import build_vnet
from autoseg.planning.network_topology import NetworkTopology

Builder = Callable[[NetworkTopology, int, int], nn.Module]

ARCHITECTURES: dict[str, Builder] = {
    "unet": build_unet,
    "resenc": build_resenc,
    "vnet": build_vnet,
    "attention_unet": build_attention_unet,
    "unetpp": build_unetpp,
    "resse_unet": build_resse_unet,
    "segnet": build_segnet,
    "fcn8s": build_fcn8s,
    "deeplabv3plus": build_deeplabv3plus,
    "unetr": build_unetr,
    "transunet": build_transunet,
    "swin_unetr": build_swin_unetr,
}


RECIPES: dict[str, dict[str, object]] = {
    "unetr": UNETR_RECIPE,
    "transunet": TRANSUNET_RECIPE,
    "swin_unetr": SWIN_UNETR_RECIPE,
}
"""Training defaults an architecture declares (``TrainSettings`` field -> value), applied under the settings file
and the command-line options; an architecture not listed trains with ``TrainSettings``' defaults."""


def default_recipe(architecture: str) -> dict[str, object]:
    return dict(RECIPES.get(architecture, {}))


def available() -> list[str]:
    return sorted(ARCHITECTURES)


def build_network(topology: NetworkTopology, in_channels: int, num_classes: int) -> nn.Module:
    if topology.architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {topology.architecture!r} (available: {', '.join(available())})"
        )
    return ARCHITECTURES[topology.architecture](topology, in_channels, num_classes)


def registered_builder(topo: NetworkTopology) -> Builder:
    """The registered builder (part of the cache key, so re-registering a name is measured anew)."""
    if topo.architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {topo.architecture!r} (available: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[topo.architecture]


def cache_key(topo: NetworkTopology) -> tuple:
    """A hashable form of ``topo`` (for per-topology caches of measurements)."""
    return (
        topo.architecture,
        topo.dim,
        tuple(map(tuple, topo.strides)),
        tuple(map(tuple, topo.kernel_sizes)),
        tuple(topo.features_per_stage),
        topo.n_conv_per_stage,
        topo.deep_supervision,
    )


def topology_from_key(key: tuple) -> NetworkTopology:
    arch, dim, strides, kernels, feats, n_conv, ds = key
    return NetworkTopology(
        arch, dim, [list(s) for s in strides], [list(k) for k in kernels], list(feats), n_conv, ds
    )


def network_parameters(topo: NetworkTopology, in_channels: int, num_classes: int) -> int:
    """Weights of the network ``topo`` builds (counted on the meta device, cached)."""
    return _parameters(registered_builder(topo), cache_key(topo), in_channels, num_classes)


@functools.lru_cache(maxsize=256)
def _parameters(builder: Builder, key: tuple, in_channels: int, num_classes: int) -> int:
    topo = topology_from_key(key)
    return count_parameters(on_meta(lambda: builder(topo, in_channels, num_classes)))
