"""Networks describe themselves: parameters, saved activations and FLOPs measured on the meta device (checked
by hand on tiny networks), their extension from reference patches, the cache, and the memory model on top."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autoseg.networks import ARCHITECTURES, build_network, measure
from autoseg.networks.unet import build_unet
from autoseg.planning import memory, speed, topology
from autoseg.planning.planner import make_plans
from autoseg.planning.plans import NetworkTopology
from tests.planning.test_planning import _fingerprint, _spec


def _sum(outputs, target):
    return outputs.sum()  # saves nothing for backward (its gradient is a broadcast of ones)


def test_single_convolution_by_hand():
    # Conv3d 1 -> 2 channels, 3×3×3 kernel with bias: 2·27 + 2 = 56 weights. On a 4×4×4 patch (64 voxels):
    # forward 64 · 27 · 1 · 2 multiply-adds = 3456, i.e. 6912 FLOPs; backward computes the weight gradient
    # (another 6912) and no input gradient (the input needs none): 13824. Saved for backward: the input only
    # (1 × 64 float32 = 256 bytes); the weight is a parameter and not counted.
    conv = measure.on_meta(lambda: nn.Conv3d(1, 2, 3, padding=1))
    assert measure.count_parameters(conv) == 56
    assert measure.step_flops(conv, 1, [4, 4, 4], _sum) == 13824
    assert measure.saved_activation_bytes(conv, 1, [4, 4, 4], _sum) == 256
    assert measure.saved_activation_bytes(conv, 1, [4, 4, 4], _sum, batch=3) == 3 * 256


@pytest.mark.parametrize("inplace", [False, True])
def test_two_layer_activations_by_hand(inplace):
    # conv 1->2 (3³) -> ReLU -> conv 2->1 (1³), patch 4³: conv 1 saves the input (64 · 4 = 256 bytes), ReLU its
    # output (2 · 64 · 4 = 512 bytes), which is also conv 2's saved input: one storage, counted once; in place,
    # the ReLU output is conv 1's output storage: still 768. FLOPs: conv 1 13824 (as above), conv 2
    # 2·64·2 = 256 forward + 256 input gradient + 256 weight gradient.
    net = measure.on_meta(
        lambda: nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(inplace=inplace), nn.Conv3d(2, 1, 1))
    )
    assert measure.saved_activation_bytes(net, 1, [4, 4, 4], _sum) == 256 + 512
    assert measure.step_flops(net, 1, [4, 4, 4], _sum) == 13824 + 3 * 256
    assert measure.count_parameters(net) == sum(p.numel() for p in net.parameters()) == 56 + 3


def test_leaky_relu_keeps_its_input_and_conv_2_its_output():
    # a (non in-place) LeakyReLU saves its input (conv 1's output, 512 bytes), conv 2 saves the LeakyReLU's
    # output (another 512): two storages, 256 + 512 + 512
    net = measure.on_meta(
        lambda: nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.LeakyReLU(0.01), nn.Conv3d(2, 1, 1))
    )
    assert measure.saved_activation_bytes(net, 1, [4, 4, 4], _sum) == 1280


def test_unet_step_flops_by_hand():
    # 2-stage U-Net, patch 4³, features 2 and 4, 3³ kernels, 1 input channel, 2 classes, 2 convs per stage.
    # Forward: encoder 0: 64 vox · 27 · (1·2 + 2·2) · 2 = 20736; encoder 1: 8 · 27 · (2·4 + 4·4) · 2 = 10368;
    # transposed conv 8 · 8 · 4·2 · 2 = 1024; decoder convs 64 · 27 · (4·2 + 2·2) · 2 = 41472; head 64·2·2·2 = 512:
    # 74112. Backward: twice the forward (input and weight gradients), less the input gradient of the first
    # convolution (64 · 27 · 1 · 2 · 2 = 6912), whose input is the image.
    topo = NetworkTopology("unet", 3, [[1, 1, 1], [2, 2, 2]], [[3, 3, 3]] * 2, [2, 4])
    forward = 20736 + 10368 + 1024 + 41472 + 512
    assert speed.step_flops(topo, [4, 4, 4], 1, 2) == 3 * forward - 6912
    assert speed.estimate_step_seconds(1e11, 2, "cpu") == pytest.approx(2e11 / speed.CPU_FLOPS)


def test_nothing_is_allocated():
    # a 6-stage U-Net at 256×512×512, batch 4, would keep ~0.47 TB of activations (~1.8 kB per voxel and
    # sample): measured in a moment because no tensor has memory on the meta device
    strides, kernels = topology.pooling_and_kernels([256, 512, 512], [1.0, 1.0, 1.0])
    topo = NetworkTopology("unet", 3, strides, kernels, topology.features_per_stage(len(strides), 3))
    net = measure.on_meta(lambda: build_network(topo, 1, 2))
    assert all(p.device.type == "meta" for p in net.parameters())
    saved = measure.saved_activation_bytes(net, 1, [256, 512, 512], memory.training_loss(2), batch=4)
    assert saved > 4e11


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("region_based", [False, True])
def test_extension_from_reference_patches_equals_measuring_at_the_patch(arch, region_based):
    """The planner measures at two small reference patches and extends linearly in voxels: exact."""
    patch, spacing = [24, 96, 80], [3.0, 1.0, 1.0]
    strides, kernels = topology.pooling_and_kernels(patch, spacing)
    patch = topology.round_up_to_stride(patch, strides)
    topo = NetworkTopology(arch, 3, strides, kernels, topology.features_per_stage(len(strides), 3))
    net = measure.on_meta(lambda: build_network(topo, 2, 3))
    loss = memory.training_loss(3, region_based)
    assert memory.activation_bytes(topo, patch, 2, 3, region_based) == measure.saved_activation_bytes(
        net, 2, patch, loss
    )
    assert speed.step_flops(topo, patch, 2, 3, region_based) == measure.step_flops(net, 2, patch, loss)
    assert memory.network_parameters(topo, 2, 3) == sum(p.numel() for p in net.parameters())
    with pytest.raises(ValueError, match="not divisible by total stride"):
        memory.activation_bytes(topo, [p + 1 for p in patch], 2, 3)


def test_memory_model_on_the_measurement():
    topo = NetworkTopology("unet", 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 3, [8, 16, 32])
    patch = [16, 16, 16]
    cost = memory.network_cost(topo, 1, 2)
    saved = cost.saved_bytes(patch)
    assert saved == memory.activation_bytes(topo, patch, 1, 2) > 0
    for batch, amp in ((1, True), (3, True), (2, False)):
        expected = int(
            batch * saved * (0.5 if amp else 1.0) * memory.ACTIVATION_OVERHEAD
            + 16 * cost.parameters
            + memory.WORKSPACE_BYTES
        )
        assert memory.estimate_step_bytes(topo, patch, batch, 1, 2, amp=amp) == expected


def test_measurements_are_cached_and_a_re_registered_name_is_measured_anew(monkeypatch):
    topo = NetworkTopology("unet", 2, [[1, 1], [2, 2]], [[3, 3]] * 2, [4, 8])
    first = memory.network_cost(topo, 1, 2)
    hits = memory._cost.cache_info().hits
    assert memory.network_cost(topo, 1, 2) == first
    assert memory._cost.cache_info().hits == hits + 1

    def wider(t, cin, k):  # same name, another network: twice the widths
        return build_unet(NetworkTopology("unet", 2, t.strides, t.kernel_sizes, [8, 16]), cin, k)

    monkeypatch.setitem(ARCHITECTURES, "unet", wider)
    assert memory.network_cost(topo, 1, 2).parameters > first.parameters


def test_explain_shows_parameters_activations_and_flops_per_configuration():
    fp = _fingerprint([[1, 1, 1]] * 260, [[36, 50, 35]] * 260)
    plans = make_plans(_spec(labels=("anterior", "posterior")), fp)
    for name, c in plans.configurations.items():
        (line,) = [r for r in plans.reasons if r.startswith(f"{name}: ")]
        net = build_network(c.network, 1, 3)
        params = sum(p.numel() for p in net.parameters())
        saved = memory.activation_bytes(c.network, c.patch_size, 1, 3)
        flops = speed.step_flops(c.network, c.patch_size, 1, 3) * c.batch_size
        assert f"{params / 1e6:.2f} M parameters" in line
        assert f"{saved / 1024**3:.3g} GB of activations saved per sample" in line
        assert f"{flops / 1e12:.3g} TFLOP per step of {c.batch_size}" in line
        assert c.estimated_step_seconds["cpu"] == round(flops / speed.CPU_FLOPS, 3)
    assert math.prod(plans.configurations["3d_fullres"].patch_size) == 40 * 56 * 40


def test_planning_does_not_touch_the_random_state_or_the_grad_mode():
    state = torch.random.get_rng_state()
    topo = NetworkTopology("vnet", 3, [[1, 1, 1], [2, 2, 2]], [[3, 3, 3]] * 2, [4, 8])
    with torch.inference_mode():  # e.g. called from a predictor
        assert memory.network_cost(topo, 1, 2, region_based=True).parameters > 0
        assert speed.step_flops(topo, [8, 8, 8], 1, 2, region_based=True) > 0
    assert torch.equal(state, torch.random.get_rng_state())
    assert torch.is_grad_enabled()


def test_a_one_stage_network_without_outputs_is_measured_without_a_loss():
    # an image too small to pool gives a 1-stage U-Net: no decoder, no deep-supervision output to train
    topo = NetworkTopology("unet", 3, [[1, 1, 1]], [[3, 3, 3]], [8])
    # patch 2³: conv 1 saves the input (8 voxels · 4 = 32 bytes); each of the 2 norms its conv's output
    # (8 channels · 8 · 4 = 256), each in-place LeakyReLU its norm's output (256, also conv 2's input); and per
    # norm its mean, inverse std and weight repeated per sample (3 · 8 floats = 96). Not a multiple of the
    # voxels: the statistics stay fixed when the patch grows (4³: 256 + 4 · 2048 + 192).
    assert memory.activation_bytes(topo, [2, 2, 2], 1, 2) == 32 + 4 * 256 + 2 * 96
    assert memory.activation_bytes(topo, [4, 4, 4], 1, 2) == 256 + 4 * 2048 + 2 * 96
    assert speed.step_flops(topo, [2, 2, 2], 1, 2) == 2 * 8 * 27 * (1 * 8 + 8 * 8)
