"""The classic networks of issue 16, each built from planned topologies (3D isotropic, 3D anisotropic, 2D):
output sizes, deep-supervision outputs, one training step, TorchScript and ONNX export with matching logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoseg.networks import ARCHITECTURES, build_network
from autoseg.networks.deeplabv3plus import aspp_rates, atrous_plan, output_grid
from autoseg.networks.losses import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights
from autoseg.networks.resse_unet import SEResidualBlock, SqueezeExcitation
from autoseg.networks.segnet import max_unpool
from autoseg.networks.unetpp import UNetPlusPlus
from autoseg.planning import topology
from autoseg.planning.plans import NetworkTopology

# how each network answers in training mode with deep supervision: "pyramid" = one output per decoder stage,
# highest resolution first (as U-Net); "nested" = one full-resolution output per nested head (UNet++);
# "single" = one full-resolution output in a list
OUTPUTS = {
    "attention_unet": "pyramid",
    "unetpp": "nested",
    "resse_unet": "pyramid",
    "segnet": "single",
    "fcn8s": "single",
    "deeplabv3plus": "single",
}
NETWORKS = sorted(OUTPUTS)
# 3D anisotropic (z at 3 mm: kernels 1×3×3 and z not pooled at first), 3D isotropic, 2D
CASES = [([16, 32, 32], [3.0, 1.0, 1.0]), ([16, 16, 16], [1.0, 1.0, 1.0]), ([32, 48], [1.0, 1.0])]
CASE_IDS = ["3d-aniso", "3d-iso", "2d"]


def planned(arch: str, patch: list[int], spacing: list[float], base: int = 4) -> NetworkTopology:
    strides, kernels = topology.pooling_and_kernels(patch, spacing)
    feats = [base * 2**i for i in range(len(strides))]
    return NetworkTopology(arch, len(patch), strides, kernels, feats)


def expected_shapes(kind: str, topo: NetworkTopology, patch: list[int], batch: int, k: int) -> list[tuple]:
    if kind == "single":
        return [(batch, k, *patch)]
    if kind == "nested":
        return [(batch, k, *patch)] * (topo.n_stages - 1)
    shapes, size = [], list(patch)
    for stride in topo.strides[: topo.n_stages - 1]:
        size = [s // st for s, st in zip(size, stride)]
        shapes.append((batch, k, *size))
    return shapes


def test_every_network_of_the_issue_is_registered():
    assert set(NETWORKS) <= set(ARCHITECTURES)


def test_the_anisotropic_case_plans_anisotropic_strides_and_kernels():
    topo = planned("unet", *CASES[0])
    assert topo.kernel_sizes[0] == [1, 3, 3] and topo.strides[1] == [1, 2, 2]


@pytest.mark.parametrize("arch", NETWORKS)
@pytest.mark.parametrize("patch, spacing", CASES, ids=CASE_IDS)
def test_outputs_keep_the_input_size_and_deep_supervision_has_the_right_shapes(arch, patch, spacing):
    topo = planned(arch, patch, spacing)
    net = build_network(topo, in_channels=2, num_classes=3)
    x = torch.randn(2, 2, *patch)
    outs = net.train()(x)
    assert isinstance(outs, list)
    assert [tuple(o.shape) for o in outs] == expected_shapes(OUTPUTS[arch], topo, patch, 2, 3)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 3, *patch)
    net.deep_supervision = False  # training without deep supervision: the full-resolution logits alone
    assert net.train()(x).shape == (2, 3, *patch)


def _first_convolution(net: torch.nn.Module, in_channels: int) -> torch.nn.Module:
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    return next(m for m in convs if m.in_channels == in_channels)


@pytest.mark.parametrize("arch", NETWORKS)
@pytest.mark.parametrize("patch, spacing", CASES[::2], ids=CASE_IDS[::2])
def test_one_training_step_gives_a_finite_loss_and_gradients_down_to_the_first_convolution(
    arch, patch, spacing
):
    torch.manual_seed(0)
    topo = planned(arch, patch, spacing)
    net = build_network(topo, in_channels=2, num_classes=3).train()
    x = torch.randn(2, 2, *patch)
    y = torch.randint(0, 3, (2, 1, *patch))
    loss = DeepSupervisionLoss(DiceCELoss())(net(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    grad = _first_convolution(net, 2).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("arch", NETWORKS)
@pytest.mark.parametrize("patch, spacing", CASES[::2], ids=CASE_IDS[::2])
def test_torchscript_and_onnx_exports_give_the_same_logits(arch, patch, spacing, tmp_path):
    torch.manual_seed(0)
    net = build_network(planned(arch, patch, spacing), in_channels=2, num_classes=3)
    for m in net.modules():  # non-trivial norms, so that a dropped or misplaced layer shows in the logits
        if isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    net.deep_supervision = False
    net.eval()
    x = torch.randn(1, 2, *patch)
    with torch.no_grad():
        expected = net(x)
        traced = torch.jit.trace(net, x)
        x2 = torch.randn(1, 2, *patch)
        torch.testing.assert_close(traced(x2), net(x2), rtol=1e-4, atol=1e-5)
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package (dev extra)")
    pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (dev extra)")
    ort = pytest.importorskip("onnxruntime", reason="the check runs the model in onnxruntime (dev extra)")
    path = tmp_path / "net.onnx"
    with torch.no_grad():
        torch.onnx.export(net, (x,), str(path), input_names=["image"], output_names=["logits"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": x.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_unetpp_accurate_mode_averages_the_heads_and_fast_mode_prunes():
    torch.manual_seed(0)
    topo = planned("unetpp", [16, 32, 32], [3.0, 1.0, 1.0])  # 4 stages: heads at depths 1, 2, 3
    net = UNetPlusPlus(topo, 2, 3).eval()
    assert len(net.heads) == 3 and len(net.nodes) == 6  # 3 + 2 + 1 nested nodes
    x = torch.randn(1, 2, 16, 32, 32)
    with torch.no_grad():
        heads = net.train()(x)  # deepest first
        net.eval()
        torch.testing.assert_close(net(x), torch.stack(heads).mean(0))
        net.inference = "fast"
        net.prune_depth = 3
        torch.testing.assert_close(net(x), heads[0])
        net.prune_depth = 1
        torch.testing.assert_close(net(x), heads[2])
        for module in (net.encoder[2], net.encoder[3], net.nodes["0_2"], net.heads[1]):
            for p in module.parameters():  # nothing deeper than X[0][1] is used when pruned at depth 1
                p.add_(1.0)
        torch.testing.assert_close(net(x), heads[2])
        assert not torch.allclose(net.train()(x)[0], heads[0])  # the perturbation does reach the deepest head
    with pytest.raises(ValueError, match="prune depth 4 out of range"):
        UNetPlusPlus(topo, 2, 3, inference="fast", prune_depth=4)
    with pytest.raises(ValueError, match="inference mode 'fastest' unknown"):
        UNetPlusPlus(topo, 2, 3, inference="fastest")


def test_outputs_of_one_resolution_weigh_the_same_in_the_loss():
    assert deep_supervision_weights(3, same_resolution=True) == pytest.approx([1 / 3] * 3)
    y = torch.randint(0, 2, (1, 1, 8, 8))
    a, b = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    inner = DiceCELoss()
    expected = (inner(a, y) + inner(b, y)) / 2
    torch.testing.assert_close(DeepSupervisionLoss(inner)([a, b], y), expected)


def test_squeeze_excitation_scales_each_channel_by_a_function_of_its_spatial_mean():
    se = SqueezeExcitation(3, 32)
    assert se.fc[0].out_channels == 4  # 32 / 16 = 2 hidden units, raised to the minimum of 4
    x = torch.randn(2, 32, 4, 6, 6)
    with torch.no_grad():
        y = se(x)
        scale = y / x
        # one factor per (sample, channel), in (0, 1): the same at every voxel
        torch.testing.assert_close(scale, scale[..., :1, :1, :1].expand_as(scale))
        assert ((scale > 0) & (scale < 1)).all()
        # the factor depends on the spatial means only: a permutation of the voxels keeps it
        perm = x.flatten(2)[..., torch.randperm(144)].reshape(x.shape)
        torch.testing.assert_close(se(perm) / perm, scale)


def test_resse_unet_has_a_squeeze_excitation_residual_block_per_encoder_and_decoder_stage():
    topo = planned("resse_unet", *CASES[0])
    net = build_network(topo, 2, 3)
    blocks = [m for m in net.modules() if isinstance(m, SEResidualBlock)]
    assert len(blocks) == 2 * topo.n_stages - 1


@pytest.mark.parametrize("dim, stride", [(3, [1, 2, 2]), (3, [2, 2, 2]), (2, [2, 2])])
def test_segnet_unpooling_puts_each_maximum_back_where_it_came_from(dim, stride):
    x = torch.randn(2, 3, *[4] * dim)
    pool = {2: torch.nn.MaxPool2d, 3: torch.nn.MaxPool3d}[dim](stride, stride, return_indices=True)
    pooled, idx = pool(x)
    out = max_unpool(pooled, idx, stride)
    reference = {2: torch.nn.MaxUnpool2d, 3: torch.nn.MaxUnpool3d}[dim](stride, stride)(pooled, idx)
    torch.testing.assert_close(out, reference)
    kept = out != 0
    assert int(kept.sum()) == pooled.numel()  # one value per window, at its maximum
    torch.testing.assert_close(out[kept], x[kept])


def test_segnet_pools_anisotropically_and_concatenates_no_skip():
    topo = planned("segnet", *CASES[0])
    net = build_network(topo, 2, 3)
    assert [list(p.kernel_size) for p in net.pools] == topo.strides[1:]
    # every decoder block takes the width of the coarser stage alone (no concatenated skip)
    assert [blk[0][0].in_channels for blk in net.decoder] == topo.features_per_stage[:0:-1]


def test_fcn8s_fuses_the_scores_of_the_last_three_stages():
    topo = planned("fcn8s", *CASES[0])  # 4 stages: strides 1, 1×2×2, 2×2×2, 2×2×2
    net = build_network(topo, 2, 3)
    assert [c.in_channels for c in net.scores] == topo.features_per_stage[1:]
    assert [list(u.stride) for u in net.fuse_up] == [topo.strides[3], topo.strides[2]]
    assert list(net.final_up.stride) == [1, 2, 2]  # total stride of stage 1
    two = build_network(planned("fcn8s", [32, 48], [1.0, 1.0]), 2, 3)
    assert len(two.scores) == 3 and len(two.fuse_up) == 2


def test_deeplab_trades_strides_past_the_output_stride_for_dilation_per_axis():
    topo = NetworkTopology(
        "deeplabv3plus", 3, [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
        [[1, 3, 3]] + [[3, 3, 3]] * 5, [4, 8, 16, 32, 64, 64],
    )  # fmt: skip
    plan = atrous_plan(topo, 8)
    # z strides 8 in all: every stride kept; y/x: 2, 4, 8 kept, then the last two become dilations 2 and 4
    assert plan.strides == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 1, 1], [1, 1, 1]]
    assert plan.grid[-1] == [8, 8, 8] and output_grid(topo) == [8, 8, 8]
    assert plan.dilations[-1] == [1, 4, 4]
    assert plan.dilations[3] == [1, 1, 1] and plan.dilations[4] == [1, 2, 2]
    # total stride z 8, y/x 32: rates along z a quarter of those along y/x; kernel 1 -> rate 1
    assert aspp_rates(topo, [3, 3, 3], 6) == [2, 6, 6]
    assert aspp_rates(topo, [1, 3, 3], 6) == [1, 6, 6]
    net = build_network(topo, 2, 3)
    assert net.low == 2 and net.up_to_low == [4, 2, 2] and net.up_to_full == [2, 4, 4]
    x = torch.randn(1, 2, 16, 64, 64)
    assert net.eval()(x).shape == (1, 3, 16, 64, 64)
