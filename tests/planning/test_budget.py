"""The time-budget planner (``3d_budget``): the rule worked out by hand for two hand-made fingerprints and two
device throughputs, the device timer's cache, and the refusal of a budget too small for any network."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from autoseg.errors import AutosegError
from autoseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats, structure_thickness
from autoseg.io.dataset import parse_dataset_json
from autoseg.planning import budget as rule
from autoseg.planning import device
from autoseg.planning.budget import BudgetRequest, StepTime
from autoseg.planning.planner import make_plans
from autoseg.planning.plans import Plans


def _fingerprint(spacing, shape, thickness_mm, n=3) -> Fingerprint:
    cases = [
        CaseFingerprint(
            f"c{i}",
            tuple(map(float, spacing)),
            tuple(shape),
            tuple(shape),
            1.0,
            {"a": 1000},
            {"a": 1},
            "RAS",
            {"a": thickness_mm},
        )  # fmt: skip
        for i in range(n)
    ]
    return Fingerprint(3, "test", cases, [IntensityStats(100.0, 20.0, 100.0, -50.0, 400.0, 40.0, 300.0)])


def _spec():
    return parse_dataset_json(
        {
            "channel_names": {"0": "MRI"},
            "labels": {"background": 0, "a": 1},
            "file_ending": ".nii.gz",
            "numTraining": 3,
        }
    )


def proxy_timer(t32_full: float, reference_voxels: int, log: list):
    """A device whose step takes ``t32_full`` seconds for 32 base features at ``reference_voxels`` and scales
    with width² × patch voxels (the FLOPs of a convolution), so that every rung can be worked out by hand."""

    def timer(config, allowed):
        width = config.network.features_per_stage[0]
        seconds = t32_full * (width / 32) ** 2 * math.prod(config.patch_size) / reference_voxels
        log.append((width, config.spacing, config.patch_size, seconds))
        return StepTime(seconds, "measured")

    return timer


def _budget(fp, minutes, t32_full, reference_voxels):
    log: list = []
    request = BudgetRequest(minutes, "cpu", proxy_timer(t32_full, reference_voxels, log))
    return make_plans(_spec(), fp, budget=request).configurations["3d_budget"], log


def test_isotropic_fast_device_keeps_the_standard_network():
    # 64^3 voxels at 1 mm: the patch is the whole image (64^3). 10 min -> a step may take 600*0.9/400 = 1.35 s.
    # A device doing the standard (32-feature) step in 1.0 s affords it: the first rung is chosen.
    fp = _fingerprint((1, 1, 1), (64, 64, 64), thickness_mm=8.0)
    config, log = _budget(fp, 10, 1.0, 64**3)
    assert config.patch_size == [64, 64, 64] and config.spacing == [1.0, 1.0, 1.0]
    assert config.network.features_per_stage[0] == 32 and len(log) == 1
    assert config.data_identifier == "fullres"
    assert config.budget.planned_steps == int(540 / 1.0)  # 540 s of steps at 1.0 s
    assert config.budget.iters_per_epoch == 540 // 25 and config.budget.val_iters == 2  # round(21 * 0.1)
    assert config.budget.minutes == 10 and config.budget.device == "cpu"


def test_isotropic_slow_device_narrows_then_coarsens_until_a_step_fits():
    # The same data on a device 10x slower (10 s per standard step). By hand, with t = 10 * (w/32)^2 * voxels/64^3:
    #   32 features, 1 mm, 64^3:      10 s         > 1.35
    #   16 features, 1 mm, 64^3:      2.5 s        > 1.35
    #   16 features, 1.25 mm, 56^3:    1.675 s      > 1.35   (51.2 voxels, rounded up to the total stride 8)
    #   16 features, 1.5 mm, 48^3:     1.0547 s     <= 1.35  -> chosen
    # The structure is 8 mm thick, so spacing may reach 8/4 = 2 mm: the 1.5 mm rung is allowed.
    fp = _fingerprint((1, 1, 1), (64, 64, 64), thickness_mm=8.0)
    config, log = _budget(fp, 10, 10.0, 64**3)
    assert [(w, p) for w, _, p, _ in log] == [
        (32, [64, 64, 64]), (16, [64, 64, 64]), (16, [56, 56, 56]), (16, [48, 48, 48]),
    ]  # fmt: skip
    assert config.spacing == [1.5, 1.5, 1.5] and config.patch_size == [48, 48, 48]
    assert config.data_identifier == "budget"
    assert config.budget.seconds_per_step == pytest.approx(10 * 0.25 * 48**3 / 64**3, abs=1e-4)
    assert config.budget.planned_steps == int(540 / (10 * 0.25 * 48**3 / 64**3))  # 540 / 1.0546875 = 512
    assert config.budget.planned_steps == 512 and config.budget.iters_per_epoch == 20


def test_fewer_minimum_steps_buy_a_finer_spacing():
    # The slow device above with min_steps 250: a step may take 540 / 250 = 2.16 s, so the 1.25 mm rung
    # (1.675 s) fits, where 400 steps (1.35 s) needed 1.5 mm; the reason says which minimum was asked for.
    fp = _fingerprint((1, 1, 1), (64, 64, 64), thickness_mm=8.0)
    log: list = []
    request = BudgetRequest(10, "cpu", proxy_timer(10.0, 64**3, log), min_steps=250)
    assert request.seconds_per_step == pytest.approx(2.16)
    plans = make_plans(_spec(), fp, budget=request)
    config = plans.configurations["3d_budget"]
    assert config.spacing == [1.25, 1.25, 1.25] and config.patch_size == [56, 56, 56]
    assert config.budget.planned_steps == int(540 / (10 * 0.25 * 56**3 / 64**3)) == 322
    assert any("250 steps in 90% of the budget" in r for r in plans.reasons)


def test_min_steps_is_checked_and_needs_a_time_budget(phantom_dataset, tmp_path, capfd):
    from tests.test_bad_input import _error_line, _run

    for args, expected in (
        (["--min-steps", "250"], "--min-steps is only used with --time-budget"),
        (
            ["--time-budget", "2", "--min-steps", "5"],
            "--min-steps 5: must be a whole number of steps from 10",
        ),
    ):
        code, _, err = _run(capfd, "plan", phantom_dataset, "--workdir", tmp_path / "w", *args)
        assert expected in _error_line(code, err)
    assert not (tmp_path / "w").exists()


def test_anisotropic_data_coarsens_only_the_fine_axes_and_stops_at_the_thinnest_structure():
    # 5 x 1 x 1 mm (the coarse axis first), 20 x 128 x 128 voxels, thinnest structure 3 mm: the in-plane spacing
    # may reach 3/2 = 1.5 mm, so the ladder stops at 1.5x (no 2x rung), and the 5 mm axis is never touched.
    fp = _fingerprint((5, 1, 1), (20, 128, 128), thickness_mm=3.0)
    assert rule.coarsest_factor([5.0, 1.0, 1.0], {"a": 3.0})[0] == 1.5
    ladder = rule.ladder(1.5)
    assert [(r.width, r.factor, r.coverage) for r in ladder] == [
        (32, 1.0, 1.0), (16, 1.0, 1.0), (16, 1.25, 1.0), (16, 1.5, 1.0), (16, 1.5, 0.5), (16, 1.5, 0.25),
        (8, 1.0, 1.0), (8, 1.25, 1.0), (8, 1.5, 1.0), (8, 1.5, 0.5), (8, 1.5, 0.25), (8, 1.5, 0.125),
    ]  # fmt: skip
    # t32 = 25 s for the 32-feature step at 20x128x128. By hand, in-plane patches 128 (1 mm), 112 (1.25 mm:
    # 102.4 rounded up to the total stride 16), 96 (1.5 mm: 85.3 rounded up to 16); the 20 slices stay:
    #   16 features at 1.5 mm: 25/4 * 96^2/128^2 = 3.52 s > 1.35. With a patch of at most half the image
    #   (20 * 85.33^2 / 2 = 72,818 voxels) the planner shrinks, one total stride (4 x 16 x 16) at a time, the axis
    #   largest relative to the image: 20x96x96 -> 20x80x96 -> 20x80x80 -> 16x80x80 -> 16x64x80 -> 16x64x64
    #   (65,536 voxels): 25/4 * 16*64*64 / (20*128*128) = 1.25 s <= 1.35 -> chosen
    config, log = _budget(fp, 10, 25.0, 20 * 128 * 128)
    assert [(w, p) for w, _, p, _ in log] == [
        (32, [20, 128, 128]), (16, [20, 128, 128]), (16, [20, 112, 112]), (16, [20, 96, 96]), (16, [16, 64, 64]),
    ]  # fmt: skip
    assert config.network.features_per_stage[0] == 16 and config.budget.seconds_per_step == 1.25
    assert config.spacing == [5.0, 1.5, 1.5] and config.patch_size == [16, 64, 64]
    assert all(sp[0] == 5.0 for _, sp, _, _ in log)


def test_a_budget_too_small_names_the_smallest_that_would_do():
    # The cheapest rung: 8 features at 2 mm (32^3 image; a 4 mm structure keeps 2 voxels across) with a patch of
    # at most 1/8 of it (4096 voxels: 16^3): 10 * (8/32)^2 * 4096/64^3 = 0.009766 s per step; 400 steps in 90 %
    # of the budget need 4.34 s: 1 minute.
    fp = _fingerprint((1, 1, 1), (64, 64, 64), thickness_mm=4.0)
    with pytest.raises(AutosegError, match=r"--time-budget 0.05: too short .* at least 1 minutes") as err:
        _budget(fp, 0.05, 10.0, 64**3)
    assert "8 base features at 2x" in str(err.value) and "16x16x16" in str(err.value)
    config, _ = _budget(fp, 0.1, 10.0, 64**3)  # 0.0135 s allowed: the cheapest rung fits
    assert config.patch_size == [16, 16, 16] and config.spacing == [2.0, 2.0, 2.0]


def test_budget_plans_round_trip_and_standard_configurations_carry_no_budget(tmp_path):
    fp = _fingerprint((1, 1, 1), (64, 64, 64), thickness_mm=8.0)
    log: list = []
    plans = make_plans(_spec(), fp, budget=BudgetRequest(10, "cpu", proxy_timer(10.0, 64**3, log)))
    plans.save(tmp_path / "plans.json")
    raw = json.loads((tmp_path / "plans.json").read_text())
    assert "budget" not in raw["configurations"]["3d_fullres"]
    assert raw["configurations"]["3d_budget"]["budget"]["planned_steps"] == 512
    assert (
        Plans.load(tmp_path / "plans.json").configurations["3d_budget"] == plans.configurations["3d_budget"]
    )
    raw["configurations"]["3d_budget"]["budget"]["device"] = "tpu"
    (tmp_path / "plans.json").write_text(json.dumps(raw))
    with pytest.raises(AutosegError, match="budget device 'tpu' must be cpu, cuda or mps"):
        Plans.load(tmp_path / "plans.json")


def test_structure_thickness_is_the_volume_weighted_median_component_diameter():
    mask = np.zeros((20, 30, 30), bool)
    mask[5:10, 5:25, 5:25] = True  # a slab 5 voxels thick at 2 mm: 10 mm
    mask[15, 2, 2] = True  # one speck does not make it look thin
    assert structure_thickness(mask, (2.0, 1.0, 1.0)) == pytest.approx(10.0)
    line = np.zeros((9, 9, 9), bool)
    line[4, 4, :] = True
    assert structure_thickness(line, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
    across_fine = np.zeros((20, 30, 30), bool)
    across_fine[2:18, 5:10, 5:25] = True  # 5 voxels (5 mm) thick along a 1 mm axis: 2 * 3 - 1
    assert structure_thickness(across_fine, (2.0, 1.0, 1.0)) == pytest.approx(5.0)
    even = np.zeros((10, 10, 10), bool)
    even[2:6, 1:9, 1:9] = True  # 4 voxels thick: measured 3 (2 * 2 - 1), the estimate errs thin
    assert structure_thickness(even, (1.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert structure_thickness(np.zeros((4, 4, 4), bool), (1.0, 1.0, 1.0)) == 0.0


def test_device_timer_times_once_then_reuses_the_cache(tmp_path, monkeypatch):
    fp = _fingerprint((1, 1, 1), (16, 16, 16), thickness_mm=8.0)
    config = make_plans(_spec(), fp).configurations["3d_fullres"]
    cache = tmp_path / "steps.json"
    first = device.DeviceTimer("cpu", 1, 2, False, cache)(config, allowed_seconds=60.0)
    assert first.how == "measured" and first.seconds > 0
    stored = json.loads(cache.read_text())
    assert list(stored.values()) == [first.seconds]

    def no_timing(*args, **kwargs):
        raise AssertionError("a cached configuration was timed again")

    monkeypatch.setattr(device, "time_step", no_timing)
    again = device.DeviceTimer("cpu", 1, 2, False, cache)(config, allowed_seconds=60.0)
    assert again == StepTime(first.seconds, "cached")
    # another configuration far slower than allowed is estimated from the measured rate, not timed
    slow = device.DeviceTimer("cpu", 1, 2, False, tmp_path / "other.json")
    slow.rate = 1.0  # FLOP/s: any real step would take far longer than 1 ms
    assert slow(config, allowed_seconds=1e-3).how == "estimated"


def test_an_absent_device_is_assumed_at_its_stated_throughput(tmp_path, monkeypatch):
    fp = _fingerprint((1, 1, 1), (16, 16, 16), thickness_mm=8.0)
    config = make_plans(_spec(), fp).configurations["3d_fullres"]
    monkeypatch.setattr(device, "device_available", lambda name: name == "cpu")
    timer = device.DeviceTimer("cuda", 1, 2, False, tmp_path / "steps.json")
    step = timer(config, allowed_seconds=1.0)
    flops = config.batch_size * device.speed.step_flops(config.network, config.patch_size, 1, 2, False)
    assert step == StepTime(flops / device.speed.GPU_FLOPS, "assumed")
    assert not (tmp_path / "steps.json").exists()


def test_plan_refuses_a_budget_too_short_in_one_line_and_writes_nothing(phantom_dataset, tmp_path, capfd):
    from tests.test_bad_input import _error_line, _run

    work = tmp_path / "work"
    cache = tmp_path / "steps.json"
    code, _, err = _run(
        capfd, "plan", phantom_dataset, "--workdir", work, "--time-budget", "0.001", "--step-cache", cache
    )
    line = _error_line(code, err)
    assert "--time-budget 0.001: too short for any sensible network on cpu" in line
    assert "8 base features" in line and "minutes" in line
    need = int(line.rsplit("at least ", 1)[1].split()[0])
    assert need >= 1
    assert not (work / "plans.json").exists() and not (work / "preprocessed").exists()
    assert json.loads(cache.read_text())  # what was timed is kept for the next try


def test_train_takes_the_budget_recipe_from_the_plan_unless_given(phantom_dataset, tmp_path):
    from autoseg import api
    from autoseg.layout import WorkDir

    work = WorkDir(tmp_path / "work")
    plans = api.plan(
        phantom_dataset, work.root, workers=1, time_budget=3, device="cpu", step_cache=tmp_path / "steps.json",
        configurations=("3d_budget",),
    )  # fmt: skip
    budget = plans.configuration("3d_budget").budget
    assert budget.minutes == 3 and budget.timing == "measured" and budget.planned_steps >= rule.MIN_STEPS
    defaults = api.plan_defaults(work, "3d_budget")
    assert (defaults.time_budget_minutes, defaults.iters_per_epoch, defaults.val_iters) == (
        3, budget.iters_per_epoch, budget.val_iters,
    )  # fmt: skip
    assert api.plan_defaults(work, "3d_fullres") is None
    fold = api.train(work.root, "3d_budget", 0, device="cpu", time_budget_minutes=0.05, loader_workers=0)
    settings = json.loads((fold / "settings.json").read_text())
    assert settings["train"]["time_budget_minutes"] == 0.05  # the option wins over the plan's budget
    assert settings["train"]["iters_per_epoch"] == budget.iters_per_epoch  # the plan's recipe otherwise
    again = api.plan(
        phantom_dataset, work.root, workers=1, time_budget=3, device="cpu", step_cache=tmp_path / "steps.json",
        configurations=("3d_budget",),
    )  # fmt: skip
    assert again.configuration("3d_budget").budget.timing == "cached"
