"""The output prior: biases worked out by hand from label counts, and every registered network's output layers
really are its last biased layers (zeroed weights + prior biases give the prior everywhere)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from autoseg.networks import ARCHITECTURES, build_network
from autoseg.networks.heads import output_layers, set_output_bias
from autoseg.training.class_weights import PRIOR_FLOOR, output_prior
from tests.networks.test_classic_networks import planned

# two cases of 10x10x10 voxels: label a (1) has 100 and 50 voxels, label b (2) none
FINGERPRINT = SimpleNamespace(
    cases=[
        SimpleNamespace(label_voxels={"a": 100, "b": 0}, shape_before_crop=(10, 10, 10)),
        SimpleNamespace(label_voxels={"a": 50, "b": 0}, shape_before_crop=(10, 10, 10)),
    ]
)


def plans(regions: list[list[int]] | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        labels={"background": 0, "a": 1, "b": 2},
        num_classes=3,
        region_based=regions is not None,
        training_regions=regions or [],
    )


def test_softmax_prior_is_the_log_class_frequency_by_hand():
    # 2000 voxels: background 1850, a 150, b 0 (floored)
    expected = [math.log(1850 / 2000), math.log(150 / 2000), math.log(PRIOR_FLOOR)]
    assert output_prior(FINGERPRINT, plans()) == pytest.approx(expected)


def test_region_prior_is_the_log_odds_of_the_region_frequency_by_hand():
    prior = output_prior(FINGERPRINT, plans([[1, 2], [2]]))
    f = 150 / 2000
    assert prior == pytest.approx([math.log(f / (1 - f)), math.log(PRIOR_FLOOR / (1 - PRIOR_FLOOR))])


# FCN-8s mixes its fused scores through bias-free transposed convolutions: no bias sets its output
NO_OUTPUT_BIAS = {"fcn8s"}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize(
    "patch, spacing", [([16, 32, 32], [3.0, 1.0, 1.0]), ([32, 48], [1.0, 1.0])], ids=["3d-aniso", "2d"]
)
def test_output_layers_are_the_last_biased_layers_of_every_network(arch, patch, spacing):
    torch.manual_seed(0)
    net = build_network(planned(arch, patch, spacing), in_channels=2, num_classes=3).eval()
    prior = [math.log(0.9), math.log(0.07), math.log(0.03)]
    layers = output_layers(net)
    if arch in NO_OUTPUT_BIAS:
        assert layers == [] and set_output_bias(net, prior) == 0
        return
    assert set_output_bias(net, prior) == len(layers) > 0
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
        probs = net(torch.randn(1, 2, *patch)).softmax(1)
    expected = torch.tensor([0.9, 0.07, 0.03]).view(1, 3, *[1] * len(patch)).expand_as(probs)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)


def test_a_bias_of_the_wrong_length_is_not_written():
    net = build_network(planned("unet", [32, 48], [1.0, 1.0]), in_channels=1, num_classes=3)
    before = [h.bias.clone() for h in output_layers(net)]
    assert set_output_bias(net, [0.0, 0.0]) == 0
    assert all(torch.equal(a, h.bias) for a, h in zip(before, output_layers(net)))


def test_a_training_run_starts_its_heads_at_the_phantoms_prior_unless_told_not_to(planned_phantom, tmp_path):
    import shutil

    from autoseg.fingerprint import Fingerprint
    from autoseg.jsonio import read_json
    from autoseg.layout import WorkDir
    from autoseg.planning.plans import Plans
    from autoseg.settings import TrainSettings
    from autoseg.training.run import build_run

    work = WorkDir(shutil.copytree(planned_phantom.root, tmp_path / "work"))
    prior = output_prior(Fingerprint.from_json(read_json(work.fingerprint)), Plans.load(work.plans))
    assert prior[0] > -0.2 and all(p < prior[0] for p in prior[1:])  # the phantom is mostly background
    cpu = torch.device("cpu")
    run = build_run(work, "3d_fullres", 0, TrainSettings(), cpu, resume=False)
    for head in output_layers(run.network):
        torch.testing.assert_close(head.bias, torch.tensor(prior, dtype=head.bias.dtype))
    plain = build_run(work, "3d_fullres", 1, TrainSettings(output_prior=False), cpu, resume=False)
    assert all(not torch.allclose(h.bias, torch.tensor(prior)) for h in output_layers(plain.network))
