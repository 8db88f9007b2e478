"""UNet++'s two inference modes at predict time (issue 16): set from the settings or the command line, measured
on the cross-validation by find-best, recorded in the inference instructions, used by predict."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from autoseg.errors import AutosegError
from autoseg.inference.mirroring import structure_dice
from autoseg.inference.predictor import set_network_inference
from autoseg.inference.unetpp_modes import cheapest_mode, measure_modes, mode_name, modes
from autoseg.networks.unetpp import UNetPlusPlus
from autoseg.selection import InferenceInstructions, check_unetpp
from autoseg.settings import InferenceSettings, SettingError
from tests.networks.test_classic_networks import planned
from tests.test_bad_input import _error_line, _run


def _unetpp() -> UNetPlusPlus:
    torch.manual_seed(0)
    return UNetPlusPlus(planned("unetpp", [16, 32, 32], [3.0, 1.0, 1.0]), 1, 2).eval()  # depth 3


def test_modes_are_ordered_cheapest_first_and_the_cheapest_within_the_tolerance_wins():
    assert modes(3) == [("fast", 1), ("fast", 2), ("fast", 3), ("accurate", 3)]
    assert [mode_name(m) for m in modes(2)] == ["fast@1", "fast@2", "accurate"]
    dice = {("fast", 1): 0.80, ("fast", 2): 0.849, ("fast", 3): 0.852, ("accurate", 3): 0.85}
    assert cheapest_mode(dice, 0.005) == ("fast", 2)  # 0.849 >= 0.852 - 0.005; fast@1 is 0.052 short
    assert cheapest_mode(dice, 0.0) == ("fast", 3)  # the best itself
    assert cheapest_mode(dice, 0.1) == ("fast", 1)


def test_settings_choose_the_mode_of_a_unetpp_and_leave_other_networks_alone():
    net = _unetpp()
    set_network_inference(net, InferenceSettings(unetpp_inference="fast", unetpp_prune_depth=2))
    assert (net.inference, net.prune_depth) == ("fast", 2)
    set_network_inference(net, InferenceSettings(unetpp_inference="fast"))  # 0: the deepest
    assert (net.inference, net.prune_depth) == ("fast", 3)
    set_network_inference(net, InferenceSettings())  # auto, unresolved: accurate
    assert net.inference == "accurate"
    with pytest.raises(AutosegError, match="--prune-depth 4: UNet\\+\\+ prune depth 4 out of range .*1..3"):
        set_network_inference(net, InferenceSettings(unetpp_inference="fast", unetpp_prune_depth=4))
    plain = torch.nn.Conv3d(1, 2, 1)
    set_network_inference(plain, InferenceSettings(unetpp_inference="fast", unetpp_prune_depth=2))
    assert not hasattr(plain, "inference")
    with pytest.raises(SettingError):
        InferenceSettings(unetpp_inference="quick")


class _WholeImage:
    """A Predictor stand-in: one runner whose network sees the whole image (no tiles, no mirroring)."""

    def __init__(self, network):
        self.runners = [SimpleNamespace(network=network)]

    def predict_preprocessed(self, image, background=None):
        with torch.no_grad():
            return torch.softmax(self.runners[0].network(torch.from_numpy(image)[None]), 1)[0].numpy()


def test_every_mode_is_scored_on_the_validation_cases_and_the_network_is_left_accurate():
    net = _unetpp()
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((1, 16, 32, 32)).astype(np.float32) for _ in range(2)]
    segs = [(im[0] > 0.3).astype(np.uint8) for im in images]
    cases = {0: [(images[0], segs[0], None)], 1: [(images[1], segs[1], None)]}
    scores, seconds = measure_modes({0: _WholeImage(net), 1: _WholeImage(net)}, cases, [[1]], False)
    assert list(scores) == modes(3) and set(seconds) == set(modes(3))
    assert net.inference == "accurate"
    for mode in modes(3):  # each mode's Dice: the mean over the cases of that mode's own prediction
        net.set_inference(*mode)
        expected = [structure_dice(_WholeImage(net).predict_preprocessed(im), s, [[1]], False)[0]
                    for im, s in zip(images, segs)]  # fmt: skip
        assert scores[mode] == pytest.approx(np.mean(expected))
    assert len({round(v, 6) for v in scores.values()}) > 1  # the modes do answer differently


def test_instructions_keep_the_chosen_mode_and_refuse_a_bad_one():
    from autoseg.api import _found_unetpp
    from autoseg.postprocessing import Postprocessing

    chosen = {"inference": "fast", "prune_depth": 2, "tolerance": 0.001, "mean_dice": {}, "seconds": {}}
    base = dict(
        best="3d_fullres", configs=("3d_fullres",), folds=(0,), postprocessing=Postprocessing(),
        mean_dice=0.9, mean_dice_postprocessed=0.9, scores={}, skipped=(), predict="", dataset_hash="h",
    )  # fmt: skip
    inst = InferenceInstructions(**base, unetpp=chosen)
    again = InferenceInstructions.from_json(inst.to_json())
    assert again.unetpp == chosen
    assert "unetpp" not in InferenceInstructions(**base).to_json()  # other networks: nothing recorded
    for bad in ({"inference": "quick", "prune_depth": 1}, {"inference": "fast", "prune_depth": 0}):
        with pytest.raises(ValueError, match="unetpp"):
            check_unetpp(bad)
    auto = InferenceSettings()
    found = _found_unetpp(auto, ["3d_fullres"], again)
    assert (found.unetpp_inference, found.unetpp_prune_depth) == ("fast", 2)
    assert _found_unetpp(auto, ["2d"], again) == auto  # not the configuration find-best chose
    told = InferenceSettings(unetpp_inference="accurate")  # --unetpp-inference accurate wins
    assert _found_unetpp(told, ["3d_fullres"], again) == told
    depth_only = _found_unetpp(InferenceSettings(unetpp_prune_depth=3), ["3d_fullres"], again)
    assert (depth_only.unetpp_inference, depth_only.unetpp_prune_depth) == ("fast", 3)


def test_a_bad_mode_on_the_command_line_is_one_line_exit_2(capfd, tmp_path):
    args = ("predict", tmp_path / "w", tmp_path / "in", tmp_path / "out")
    code, _, err = _run(capfd, *args, "--unetpp-inference", "quick")
    assert "--unetpp-inference quick" in _error_line(code, err) and "auto, accurate or fast" in err
    code, _, err = _run(capfd, *args, "--prune-depth", "-1")
    assert "--prune-depth -1" in _error_line(code, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # minutes on 2 cores: two folds of a 2D UNet++ are trained, then every mode of every case
def test_find_best_records_the_cheapest_unetpp_mode_and_predict_uses_it(phantom_dataset, tmp_path, caplog):
    import logging

    from autoseg import api
    from autoseg.selection import load_instructions
    from tests.inference.test_speed_levers import _one_case_inputs, _train_tiny

    work = _train_tiny(phantom_dataset, tmp_path / "work", "2d", folds=2, iters=4, architecture="unetpp")
    found = api.find_best(work.root, ["2d"], workers=1, mirror_tolerance=1.0)  # any Dice will do: fast@1
    depth = len(api.Plans.load(work.plans).configuration("2d").network.strides) - 1
    assert found["unetpp"]["inference"] == "fast" and found["unetpp"]["prune_depth"] == 1
    assert list(found["unetpp"]["mean_dice"]) == [f"fast@{d}" for d in range(1, depth + 1)] + ["accurate"]
    assert load_instructions(work).unetpp["prune_depth"] == 1
    inputs = _one_case_inputs(phantom_dataset, tmp_path / "in")
    with caplog.at_level(logging.INFO, logger="autoseg"):
        api.predict(work.root, inputs, tmp_path / "out", device="cpu")
    assert "UNet++ fast inference pruned at depth 1, as find-best chose" in caplog.text
    strict = api.find_best(work.root, ["2d"], workers=1, mirror_tolerance=0.0)  # the best mode itself
    best = max(strict["unetpp"]["mean_dice"].values())
    name = (
        "accurate"
        if strict["unetpp"]["inference"] == "accurate"
        else f"fast@{strict['unetpp']['prune_depth']}"
    )
    assert strict["unetpp"]["mean_dice"][name] == best
