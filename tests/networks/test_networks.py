"""U-Net built from a topology: output shapes, deep supervision order, unknown architectures."""

from __future__ import annotations

import pytest
import torch

from autoseg.networks import available, build_network
from autoseg.planning import topology
from autoseg.planning.plans import NetworkTopology


@pytest.mark.parametrize("patch, spacing", [([16, 32, 32], [3.0, 1.0, 1.0]), ([32, 48], [1.0, 1.0])])
def test_unet_shapes_and_deep_supervision(patch, spacing):
    strides, kernels = topology.pooling_and_kernels(patch, spacing)
    feats = [4 * 2**i for i in range(len(strides))]
    topo = NetworkTopology("unet", len(patch), strides, kernels, feats)
    net = build_network(topo, in_channels=2, num_classes=3)
    x = torch.randn(2, 2, *patch)
    net.train()
    outs = net(x)
    assert len(outs) == len(strides) - 1
    assert outs[0].shape == (2, 3, *patch)  # highest resolution first
    for a, b in zip(outs, outs[1:]):
        assert all(sa >= sb for sa, sb in zip(a.shape[2:], b.shape[2:]))
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 3, *patch)


def test_unknown_architecture_is_a_clear_error():
    topo = NetworkTopology("transformer9000", 3, [[1, 1, 1]], [[3, 3, 3]], [8])
    with pytest.raises(ValueError, match="unknown architecture 'transformer9000'"):
        build_network(topo, 1, 2)
    assert "unet" in available()
