"""The transformer networks of issue 17 (UNETR, TransUNet, Swin-UNETR), each built from planned topologies (3D
anisotropic, 3D isotropic, 2D): output sizes, deep-supervision outputs, one training step, ONNX export with
matching logits, the rules they derive from the topology (tokens, skip layers, windows, shifted-window masks
worked by hand), the planner's measurement at the patch, and parameter counts against MONAI (dev extra)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from autoseg.errors import AutosegError
from autoseg.networks import ARCHITECTURES, build_network, measure
from autoseg.networks.losses import DeepSupervisionLoss, DiceCELoss
from autoseg.networks.swin_unetr import (
    SwinBlock,
    SwinUNETR,
    relative_position_index,
    shifted_window_mask,
    window_merge,
    window_partition,
)
from autoseg.networks.transformer import head_count, sincos_position_embedding
from autoseg.networks.transunet import TransUNet
from autoseg.networks.unetr import UNETR
from autoseg.planning import memory, speed
from autoseg.planning.planner import make_plans
from autoseg.planning.plans import NetworkTopology
from tests.networks.test_classic_networks import CASE_IDS, CASES, expected_shapes, planned
from tests.planning.test_planning import _fingerprint, _spec

# how each answers in training mode with deep supervision (as in test_classic_networks)
OUTPUTS = {"unetr": "single", "transunet": "pyramid", "swin_unetr": "single"}
NETWORKS = sorted(OUTPUTS)


def test_every_transformer_network_is_registered():
    assert set(NETWORKS) <= set(ARCHITECTURES)


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
    net.deep_supervision = False
    assert net.train()(x).shape == (2, 3, *patch)


def _input_layers(net: torch.nn.Module) -> list[torch.nn.Module]:
    """Every layer that reads the image: UNETR and Swin-UNETR have the patch embedding and the stem."""
    if isinstance(net, (UNETR, SwinUNETR)):
        return [net.embed, net.stem.conv1]
    return [net.encoder[0][0][0]]


@pytest.mark.parametrize("arch", NETWORKS)
@pytest.mark.parametrize("patch, spacing", CASES[::2], ids=CASE_IDS[::2])
def test_one_training_step_gives_a_finite_loss_and_gradients_down_to_the_first_layers(arch, patch, spacing):
    torch.manual_seed(0)
    net = build_network(planned(arch, patch, spacing), in_channels=2, num_classes=3).train()
    x = torch.randn(2, 2, *patch)
    y = torch.randint(0, 3, (2, 1, *patch))
    loss = DeepSupervisionLoss(DiceCELoss())(net(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    layers = _input_layers(net) + ([net.embed] if isinstance(net, TransUNet) else [])  # + the token embedding
    for layer in layers:
        grad = layer.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())


def _export_ready(arch: str, patch: list[int], spacing: list[float]) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_network(planned(arch, patch, spacing), in_channels=2, num_classes=3)
    for m in net.modules():  # non-trivial norms, so that a dropped or misplaced layer shows in the logits
        if isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d, torch.nn.LayerNorm)):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    net.deep_supervision = False
    return net.eval()


@pytest.mark.parametrize("arch", NETWORKS)
@pytest.mark.parametrize("patch, spacing", CASES[::2], ids=CASE_IDS[::2])
def test_torchscript_trace_gives_the_same_logits_on_another_input(arch, patch, spacing):
    net = _export_ready(arch, patch, spacing)
    with torch.no_grad():
        traced = torch.jit.trace(net, torch.randn(1, 2, *patch))
        x = torch.randn(2, 2, *patch)
        torch.testing.assert_close(traced(x), net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # torch's ONNX exporter takes 15-20 s per transformer network on one core
@pytest.mark.parametrize("arch", NETWORKS)
@pytest.mark.parametrize("patch, spacing", CASES[::2], ids=CASE_IDS[::2])
def test_onnx_export_gives_the_same_logits(arch, patch, spacing, tmp_path):
    """Exported with a dynamic batch axis (as ``autoseg export``, but from a batch of 2: torch.export
    specialises a batch of 1 to a constant), run in onnxruntime on batches of 2 and 1."""
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package (dev extra)")
    pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (dev extra)")
    ort = pytest.importorskip("onnxruntime", reason="the check runs the model in onnxruntime (dev extra)")
    net = _export_ready(arch, patch, spacing)
    path = tmp_path / "net.onnx"
    x = torch.randn(2, 2, *patch)
    with torch.no_grad():
        expected = net(x)
        torch.onnx.export(
            net,
            (x,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            external_data=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (2, 1):
        (got,) = session.run(["logits"], {"image": x[:batch].numpy()})
        np.testing.assert_allclose(got, expected[:batch].numpy(), rtol=1e-4, atol=1e-4)


# --- what each network derives from the topology ----------------------------------------------------------


def test_unetr_tokens_and_skip_layers_follow_the_topology():
    # 3D anisotropic: strides 1, 1×2×2, 2×2×2, 2×2×2 -> 3 decoder levels, tokens of 4×8×8 voxels (the stage-3
    # grid), skips from layers 4 and 8 of 12 and the last; hidden 24 × 4 = 96 with 12 heads
    net = build_network(planned("unetr", [16, 32, 32], [3.0, 1.0, 1.0]), 1, 2)
    assert net.token_size == [4, 8, 8] and net.skip_layers == [4, 8] and net.hidden == 96
    assert net.blocks[0].attn.heads == 12 and len(net.blocks) == 12
    # isotropic 6 stages (the paper's case): tokens 16³, skips from layers 3, 6, 9
    net = build_network(planned("unetr", [64, 64, 64], [1.0, 1.0, 1.0]), 1, 2)
    assert net.token_size == [16, 16, 16] and net.skip_layers == [3, 6, 9]
    with pytest.raises(ValueError, match=r"not divisible by its token size \[16, 16, 16\]"):
        net(torch.zeros(1, 1, 48, 48, 40))


def test_swin_windows_shifts_and_heads_per_stage():
    block = SwinBlock(3, 48, 3, shifted=True)
    # a 2-voxel axis fits one window: window 2, no shift; a 9-voxel axis gets a 7-wide window shifted by 3
    assert block.windows([2, 9, 7]) == ([2, 7, 7], [0, 3, 0])
    assert SwinBlock(3, 48, 3, shifted=False).windows([2, 9, 7]) == ([2, 7, 7], [0, 0, 0])
    assert [head_count(48 * 2**i, 16) for i in range(4)] == [3, 6, 12, 24]  # the paper's heads at C = 48
    assert head_count(40, 16) == 2 and head_count(4, 16) == 1
    # a map not divisible by its window is padded inside the block and cropped back
    x = torch.randn(1, 3, 9, 10, 48)
    assert block(x).shape == x.shape


def test_window_partition_and_merge_are_inverse_and_group_neighbours():
    x = torch.arange(4 * 6, dtype=torch.float32).reshape(1, 4, 6, 1)
    windows = window_partition(x, [2, 3])
    assert windows.shape == (1, 4, 6, 1)
    assert windows[0, 1, :, 0].tolist() == [3, 4, 5, 9, 10, 11]  # second window: rows 0-1, columns 3-5
    torch.testing.assert_close(window_merge(windows, [2, 3], [4, 6]), x)


def test_shifted_window_mask_by_hand():
    """4×4 map, 2×2 windows shifted by 1: along each axis regions {0, 1}, {2}, {3}. Window (0, 0) lies in one
    region (16 allowed pairs of 16), windows (0, 1) and (1, 0) in two regions of 2 tokens (8), window (1, 1)
    in four regions of one token (4, the diagonal)."""
    mask = shifted_window_mask([4, 4], [2, 2], [1, 1], "cpu")
    assert mask.shape == (4, 4, 4)
    assert [(m == 0).sum().item() for m in mask] == [16, 8, 8, 4]
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert (shifted_window_mask([4, 4], [2, 2], [0, 0], "cpu") == 0).all()  # no shift: nothing masked


def test_relative_position_index_by_hand():
    # table for 7×7 windows: 13×13 rows, offset (dy, dx) at row (dy + 6)·13 + dx + 6
    index = relative_position_index([2, 3], [7, 7], "cpu")
    assert index.shape == (6, 6)
    assert index[0, 0] == 6 * 13 + 6  # offset (0, 0)
    assert index[5, 0] == (1 + 6) * 13 + (2 + 6)  # token (1, 2) seen from (0, 0)
    assert index[0, 5] == (-1 + 6) * 13 + (-2 + 6)
    assert relative_position_index([7, 7, 7], [7, 7, 7], "cpu").unique().numel() == 13**3


def test_sincos_codes_differ_per_token_and_pad_the_rest():
    codes = sincos_position_embedding([2, 3, 4], 20, "cpu")  # 3 axes × 2 × 3 channels = 18, 2 zero
    assert codes.shape == (24, 20)
    assert (codes[:, 18:] == 0).all()
    assert torch.unique(codes, dim=0).shape[0] == 24


# --- planning ---------------------------------------------------------------------------------------------


def test_attention_memory_is_measured_at_the_patch_not_extended_linearly():
    """UNETR's attention weights grow with the square of the tokens: doubling the patch along one axis more
    than doubles what its attention saves, so the planner measures at the patch itself."""
    topo = NetworkTopology("unetr", 3, [[1, 1, 1]] + [[2, 2, 2]] * 2, [[3, 3, 3]] * 3, [2, 4, 8])
    net = measure.on_meta(lambda: build_network(topo, 1, 2))
    loss = memory.training_loss(2)
    small, large = [16, 16, 16], [64, 16, 16]  # 64 and 256 tokens of 4³
    cost = memory.network_cost(topo, 1, 2)
    assert cost.at_patch is not None
    for patch in (small, large):
        assert memory.activation_bytes(topo, patch, 1, 2) == measure.saved_activation_bytes(
            net, 1, patch, loss
        )
        assert speed.step_flops(topo, patch, 1, 2) == measure.step_flops(net, 1, patch, loss)
    (v0, v1), (s0, s1) = cost.reference_voxels, cost.reference_saved_bytes
    affine = s0 + (s1 - s0) * (math.prod(large) - v0) // (v1 - v0)
    # 12 layers × 12 heads × 256² float32 weights of the attention alone at the large patch
    assert memory.activation_bytes(topo, large, 1, 2) > affine
    assert memory.activation_bytes(topo, large, 1, 2) > 12 * 12 * 256**2 * 4


def test_swin_unetr_refuses_images_too_small_to_pool_twice_in_one_line():
    fp = _fingerprint([[1.0, 1.0, 1.0]] * 4, [[8, 8, 8]] * 4)  # 8³: one pooling, 2 stages
    with pytest.raises(
        AutosegError, match="swin_unetr needs a topology of at least 3 stages .* got 2"
    ) as err:
        make_plans(_spec(), fp, architecture="swin_unetr")
    line = str(err.value)
    assert (
        line.startswith("--architecture swin_unetr: cannot be planned for this dataset") and "\n" not in line
    )
    can = line.split("these can: ")[1].split(", ")  # what would work: every other network plans here
    assert "unet" in can and "unetr" in can and "swin_unetr" not in can
    with pytest.raises(AutosegError, match="--architecture swin_unetr"):  # also among several
        make_plans(_spec(), fp, architecture=("unet", "swin_unetr"))
    assert make_plans(_spec(), fp, architecture="unetr").configurations["3d_fullres"].network.n_stages == 2


@pytest.mark.parametrize("arch", NETWORKS)
def test_planning_a_small_dataset_gives_a_patch_each_network_takes(arch):
    fp = _fingerprint([[2.5, 0.8, 0.8]] * 8, [[40, 96, 96]] * 8)
    plans = make_plans(_spec(), fp, gpu_memory_gb=4.0, architecture=arch)
    for c in plans.configurations.values():
        assert c.network.architecture == arch and c.estimated_memory_gb <= 4.0 and c.batch_size >= 2
        net = build_network(c.network, 1, 2)
        if isinstance(net, UNETR):
            assert all(p % t == 0 for p, t in zip(c.patch_size, net.token_size))
        with torch.device("meta"):  # the planned patch runs through the network
            out = net.to("meta").eval()(torch.empty(1, 1, *c.patch_size))
        assert out.shape == (1, 2, *c.patch_size)


# --- MONAI (dev extra) ------------------------------------------------------------------------------------


def _iso(arch: str, dim: int, base: int, stages: int = 6) -> NetworkTopology:
    strides = [[1] * dim] + [[2] * dim] * (stages - 1)
    return NetworkTopology(arch, dim, strides, [[3] * dim] * stages, [base * 2**i for i in range(stages)])


def _count(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not any(s in n for s in skip))


@pytest.mark.parametrize("dim", [2, 3])
def test_unetr_parameters_match_monai_but_the_learnt_position_embedding_and_unused_norms(dim):
    """MONAI's UNETR at feature size 12, hidden 288 (= 24 × 12), 12 heads, MLP 1152, affine instance norms, on
    a 32-voxel patch (2^dim tokens of 16) has, beyond ours: its learnt position embedding (tokens × hidden)
    and, in each of the 12 layers, a LayerNorm for cross-attention that UNETR never uses (2 × hidden)."""
    nets = pytest.importorskip("monai.networks.nets", reason="the cross-check needs MONAI (dev extra)")
    pytest.importorskip("einops", reason="MONAI's ViT needs einops (dev extra)")
    with torch.device("meta"):
        ours = build_network(_iso("unetr", dim, 12), 1, 2)
        theirs = nets.UNETR(
            1,
            2,
            (32,) * dim,
            feature_size=12,
            hidden_size=288,
            mlp_dim=1152,
            num_heads=12,
            norm_name=("instance", {"affine": True}),
            spatial_dims=dim,
        )
    tokens, hidden = 2**dim, 288
    assert _count(theirs) - _count(ours) == tokens * hidden + 12 * 2 * hidden
    assert _count(theirs, skip=("position_embeddings", "norm_cross_attn")) == _count(ours)


@pytest.mark.parametrize("dim", [2, 3])
def test_swin_unetr_parameters_match_monai_exactly(dim):
    """The paper's configuration: MONAI's SwinUNETR at feature size 48 (depths 2, 2, 2, 2, heads 3, 6, 12, 24,
    windows 7, affine instance norms; 62.2 M parameters in 3D) has exactly the parameters of ours for the
    6-stage isotropic topology of base width 48."""
    nets = pytest.importorskip("monai.networks.nets", reason="the cross-check needs MONAI (dev extra)")
    with torch.device("meta"):
        ours = build_network(_iso("swin_unetr", dim, 48), 1, 2)
    assert [stage[0].heads for stage in ours.stages] == [3, 6, 12, 24]
    theirs = nets.SwinUNETR(1, 2, feature_size=48, spatial_dims=dim, norm_name=("instance", {"affine": True}))
    assert _count(theirs) == _count(ours)
    if dim == 3:
        assert _count(ours) == 62_196_020


# --- default recipe ---------------------------------------------------------------------------------------


def test_transformers_train_by_default_with_adamw_warmup_and_cosine_unless_the_settings_say_otherwise(
    tmp_path,
):
    from autoseg import api
    from autoseg.layout import WorkDir
    from autoseg.networks.registry import default_recipe
    from autoseg.settings import TrainSettings, load_settings

    assert default_recipe("unet") == {}
    work = WorkDir(tmp_path)
    unet = make_plans(_spec(), _fingerprint([[1.0, 1.0, 1.0]] * 4, [[32, 32, 32]] * 4), architecture="unet")
    for arch in NETWORKS:  # the U-Net's plans with the architecture swapped (planning each would take longer)
        assert default_recipe(arch)["optimizer"] == "adamw"
        configs = {
            name: replace(c, network=replace(c.network, architecture=arch))
            for name, c in unet.configurations.items()
        }
        replace(unet, configurations=configs).save(work.plans)
        defaults = api.plan_defaults(work, "3d_fullres")
        expected = (default_recipe(arch)["initial_lr"], default_recipe(arch)["schedule"])
        assert (defaults.optimizer, defaults.initial_lr, defaults.schedule) == ("adamw", *expected)
        assert defaults.warmup_fraction > 0 and defaults.epochs == TrainSettings().epochs
        train, _ = load_settings(train_defaults=defaults, optimizer="sgd", initial_lr=0.01)
        assert (train.optimizer, train.initial_lr, train.schedule) == ("sgd", 0.01, "cosine")  # options win
    unet.save(work.plans)
    assert api.plan_defaults(work, "3d_fullres") is None  # U-Net: TrainSettings' own defaults
