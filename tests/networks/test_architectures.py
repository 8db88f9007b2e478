"""The three architectures (unet, resenc, vnet) from one topology: shapes, deep supervision, parameter counts
worked by hand, a short overfit, and planning with each."""

from __future__ import annotations

import json
import math

import pytest
import torch

from autoseg.cli import main
from autoseg.networks import available, build_network
from autoseg.networks.losses import DeepSupervisionLoss, DiceCELoss
from autoseg.networks.resenc import resenc_blocks_per_stage
from autoseg.networks.vnet import vnet_convs_per_stage, vnet_kernel
from autoseg.planning import memory, topology
from autoseg.planning.planner import make_plans
from autoseg.planning.plans import NetworkTopology
from tests.networks.test_classic_networks import NETWORKS as CLASSIC
from tests.networks.test_transformer_networks import NETWORKS as TRANSFORMERS
from tests.planning.test_planning import _fingerprint, _spec

ARCHS = ["unet", "resenc", "vnet"]
# 3D anisotropic (z at 3 mm: kernel 1 along z and z not pooled at first) and 2D
CASES = [([16, 32, 32], [3.0, 1.0, 1.0]), ([32, 48], [1.0, 1.0])]


def _topology(arch: str, patch: list[int], spacing: list[float], base: int = 4) -> NetworkTopology:
    strides, kernels = topology.pooling_and_kernels(patch, spacing)
    feats = [base * 2**i for i in range(len(strides))]
    return NetworkTopology(arch, len(patch), strides, kernels, feats)


def test_every_architecture_is_registered_and_the_memory_model_knows_no_other():
    assert set(ARCHS) <= set(available())
    assert set(memory.ARCHITECTURES) == set(ARCHS) | set(CLASSIC) | set(TRANSFORMERS)
    with pytest.raises(ValueError, match="unknown architecture 'transformer9000'"):
        memory.count_parameters(3, [[3, 3, 3]], [8], 1, 2, [[1, 1, 1]], architecture="transformer9000")


def test_structure_rules():
    assert resenc_blocks_per_stage(4) == [1, 3, 4, 6]
    assert resenc_blocks_per_stage(7) == [1, 3, 4, 6, 6, 6, 6]
    assert vnet_convs_per_stage(5) == [1, 2, 3, 3, 3]
    assert vnet_kernel([1, 3, 3]) == [1, 5, 5]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("patch, spacing", CASES)
def test_shapes_and_deep_supervision(arch, patch, spacing):
    topo = _topology(arch, patch, spacing)
    net = build_network(topo, in_channels=2, num_classes=3)
    x = torch.randn(2, 2, *patch)
    net.train()
    outs = net(x)
    assert len(outs) == topo.n_stages - 1
    assert outs[0].shape == (2, 3, *patch)  # highest resolution first
    size = list(patch)
    for out, stride in zip(outs[1:], topo.strides[1:]):  # each output one stride coarser than the previous
        size = [s // st for s, st in zip(size, stride)]
        assert list(out.shape) == [2, 3, *size]
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 3, *patch)


@pytest.mark.parametrize("arch, expected", [("unet", 466), ("resenc", 1112), ("vnet", 1194)])
def test_parameter_count_worked_by_hand(arch, expected):
    """2D, 2 stages, widths 2 and 4, kernels 3×3 (vnet: 5×5), 1 input channel, 2 classes.

    Conv with bias + affine norm = cin·cout·k + 3·cout.
    unet: encoder 1→2 (9·2+6) + 2→2 (36+6) + 2→4 (72+12) + 4→4 (144+12) = 306; transposed 4→2 with 2×2 kernel
      (32+2) + decoder 4→2 (72+6) + 2→2 (42) + head (4+2) = 160; total 466.
    resenc: stage 0, one block: 1→2 (24) + 2→2 (42) + 1×1 projection (2 + 4 norm) = 72; stage 1, three blocks:
      2→4 (84) + 4→4 (156) + projection (8+8) = 256, then 2 × (156+156) = 624; decoder as unet 160; total 1112.
    vnet: stage 0: 1×1 input projection 2 + conv 1→2 (50+6) + PReLU 2 = 60; stage 1: down 2→4 with 2×2 kernel
      (32+12) + PReLU 4 + 2 convs 4→4 (412 each) + 2 PReLUs of 4 = 880; decoder: transposed 4→2 (32+2) + norm 4
      + PReLU 2, conv 4→2 (200+6) + PReLU 2, head 6 = 254; total 1194.
    """
    topo = NetworkTopology(arch, 2, [[1, 1], [2, 2]], [[3, 3], [3, 3]], [2, 4])
    net = build_network(topo, in_channels=1, num_classes=2)
    assert sum(p.numel() for p in net.parameters()) == expected
    assert memory.count_parameters(2, topo.kernel_sizes, [2, 4], 1, 2, topo.strides, architecture=arch) == (
        expected
    )


def test_vnet_uses_5_wide_kernels_except_along_coarse_axes():
    topo = _topology("vnet", [16, 32, 32], [3.0, 1.0, 1.0])
    assert topo.kernel_sizes[0] == [1, 3, 3]
    net = build_network(topo, 1, 2)
    kernels = {tuple(m.kernel_size) for m in net.modules() if isinstance(m, torch.nn.Conv3d)}
    assert (1, 5, 5) in kernels and (5, 5, 5) in kernels
    assert not any(3 in k for k in kernels)  # 3-wide topology kernels are all widened
    assert any(isinstance(m, torch.nn.PReLU) for m in net.modules())


@pytest.mark.parametrize("arch", ARCHS + CLASSIC + TRANSFORMERS)
def test_a_few_dozen_sgd_steps_overfit_one_batch(arch):
    torch.manual_seed(0)
    patch = [8, 16, 16]
    topo = _topology(arch, patch, [2.0, 1.0, 1.0])  # 3 stages, strides 1, 2×2×2, 1×2×2
    net = build_network(topo, in_channels=1, num_classes=2)
    # a bright box on noise; the label is the box
    y = torch.zeros(2, 1, *patch, dtype=torch.long)
    box = (slice(None), slice(None), *[slice(p // 4, 3 * p // 4) for p in patch])
    y[box] = 1
    x = y.float() + 0.5 * torch.randn(y.shape)
    loss_fn = DeepSupervisionLoss(DiceCELoss())
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    net.train()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # CE starts near ln 2 = 0.69 and the soft Dice of the box low: the loss starts at 0.3-0.7; a perfect fit is -1
    assert min(losses[-5:]) < losses[0] - 0.5, losses


# the transformers are measured at every candidate patch (attention is not linear in the voxels): 10-15 s each
SLOW_TO_PLAN = [pytest.param(a, marks=pytest.mark.slow) for a in TRANSFORMERS]


@pytest.mark.parametrize("arch", ARCHS + CLASSIC + SLOW_TO_PLAN)
def test_planning_with_each_architecture_fits_the_budget(arch):
    # prostate-like: 3.6×0.6×0.6 mm, 20×320×320 voxels, two channels
    fp = _fingerprint([[3.6, 0.6, 0.6]] * 32, [[20, 320, 320]] * 32, n_channels=2)
    plans = make_plans(_spec(channels=("T2", "ADC"), labels=("pz", "tz")), fp, architecture=arch)
    for c in plans.configurations.values():
        net = c.network
        assert net.architecture == arch
        assert c.batch_size >= 2 and c.estimated_memory_gb <= 8.0
        assert all(p % t == 0 for p, t in zip(c.patch_size, net.total_stride()))
    for c in (plans.configurations["2d"], plans.configurations["3d_fullres"]):
        est = memory.estimate_step_bytes(c.network, c.patch_size, c.batch_size, 2, 3)
        assert c.estimated_memory_gb == round(est / 1024**3, 3)


@pytest.mark.slow  # 31-107 s on the 2-core development machine; kept out of CI (scripts/test.sh -m slow)
def test_heavier_architectures_get_smaller_patches_under_the_same_budget():
    fp = _fingerprint([[1, 1, 1]] * 10, [[200, 200, 200]] * 10)
    voxels = {
        arch: math.prod(make_plans(_spec(), fp, architecture=arch).configurations["3d_fullres"].patch_size)
        for arch in ARCHS
    }
    assert voxels["vnet"] <= voxels["resenc"] <= voxels["unet"]
    assert voxels["vnet"] < voxels["unet"]


def test_cli_plan_records_the_architecture(phantom_dataset, tmp_path, capsys):
    work = tmp_path / "work"
    code = main(
        ["plan", str(phantom_dataset), "--workdir", str(work), "--workers", "1", "--architecture", "vnet"]
    )
    assert code == 0, capsys.readouterr().err
    plans = json.loads((work / "plans.json").read_text())
    assert {c["network"]["architecture"] for c in plans["configurations"].values()} == {"vnet"}
    assert main(["plan", str(phantom_dataset), "--workdir", str(work), "--architecture", "nope"]) == 2
