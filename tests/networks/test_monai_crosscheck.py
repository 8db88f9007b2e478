"""An independent check against MONAI (dev extra only, never a dependency) where a configuration of ours
matches one of MONAI's: parameter counts of the attention gate, output shapes and head counts of the
networks. MONAI's networks differ in their blocks (max pooling, batch norm, 3×3 transposed convolutions, no
deep supervision for AttentionUnet), so whole-network parameter counts are not comparable."""

from __future__ import annotations

import pytest
import torch

from autoseg.networks import build_network
from autoseg.networks.attention_unet import AttentionGate
from autoseg.planning.plans import NetworkTopology

monai_nets = pytest.importorskip("monai.networks.nets", reason="the cross-check needs MONAI (dev extra)")
monai_attention = pytest.importorskip("monai.networks.nets.attentionunet")


def _iso(arch: str, dim: int, feats: list[int]) -> NetworkTopology:
    n = len(feats)
    strides = [[1] * dim] + [[2] * dim] * (n - 1)
    return NetworkTopology(arch, dim, strides, [[3] * dim] * n, feats)


@pytest.mark.parametrize("dim, f_g, f_l, f_int", [(2, 8, 8, 4), (3, 16, 16, 8), (3, 32, 32, 16)])
def test_attention_gate_has_monai_attention_block_parameters_and_shape(dim, f_g, f_l, f_int):
    ours = AttentionGate(dim, f_g, f_l, f_int)  # stride 1: gating on the skip's grid, as MONAI gates
    theirs = monai_attention.AttentionBlock(spatial_dims=dim, f_int=f_int, f_g=f_g, f_l=f_l)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    x, g = torch.randn(2, f_l, *[8] * dim), torch.randn(2, f_g, *[8] * dim)
    assert ours(x, g).shape == theirs.eval()(g=g, x=x).shape == x.shape


@pytest.mark.parametrize("dim", [2, 3])
def test_attention_unet_logits_have_the_shape_of_monai_attention_unet(dim):
    feats = [4, 8, 16, 32]
    ours = build_network(_iso("attention_unet", dim, feats), 2, 3).eval()
    theirs = monai_nets.AttentionUnet(dim, 2, 3, channels=feats, strides=[2, 2, 2]).eval()
    x = torch.randn(1, 2, *[16] * dim)
    with torch.no_grad():
        assert ours(x).shape == theirs(x).shape == (1, 3, *[16] * dim)


@pytest.mark.parametrize("dim", [2, 3])
def test_unetpp_heads_match_monai_basic_unetplusplus(dim):
    """Five stages (MONAI's fixed depth): four nested full-resolution heads in both."""
    ours = build_network(_iso("unetpp", dim, [4, 4, 8, 16, 32]), 2, 3).train()
    theirs = monai_nets.BasicUNetPlusPlus(dim, 2, 3, features=(4, 4, 8, 16, 32, 4), deep_supervision=True)
    x = torch.randn(2, 2, *[32] * dim)
    ours_out, theirs_out = ours(x), theirs.train()(x)
    assert [o.shape for o in ours_out] == [t.shape for t in theirs_out] == [(2, 3, *[32] * dim)] * 4
