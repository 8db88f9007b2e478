"""One WORK, many networks: ``plan --architecture unet,attention_unet,unetpp`` plans one configuration per
(resolution, architecture), each sized on its own, sharing preprocessed data where the spacing is the same."""

from __future__ import annotations

import json

import pytest

from autoseg import api
from autoseg.cli import main
from autoseg.errors import AutosegError
from autoseg.layout import WorkDir
from autoseg.planning import memory
from autoseg.planning.planner import configuration_suffix, make_plans, share_data
from tests.planning.test_planning import _fingerprint, _spec


def test_plain_names_stay_unet_and_the_others_carry_their_architecture():
    assert configuration_suffix("unet", ["unet"]) == ""
    assert configuration_suffix("unetpp", ["unetpp"]) == ""  # a single architecture: names as before
    assert configuration_suffix("unet", ["unet", "unetpp"]) == ""
    assert configuration_suffix("unetpp", ["unet", "unetpp"]) == "_unetpp"
    assert configuration_suffix("segnet", ["attention_unet", "segnet"]) == "_segnet"


def test_parse_architectures_keeps_order_drops_repeats_and_names_the_unknown_one():
    assert api.parse_architectures("unet") == ("unet",)
    assert api.parse_architectures(" unetpp, unet ,unetpp") == ("unetpp", "unet")
    assert api.parse_architectures(("segnet", "fcn8s")) == ("segnet", "fcn8s")
    with pytest.raises(AutosegError) as exc:
        api.parse_architectures("unet,transformer,unetpp")
    line = str(exc.value)
    assert "\n" not in line and "unknown architecture 'transformer'" in line
    assert all(name in line for name in api.architectures())
    with pytest.raises(AutosegError, match="an empty name"):
        api.parse_architectures("unet,,unetpp")


def test_comma_list_plans_each_network_sharing_the_preprocessed_data(phantom_dataset, tmp_path, capsys):
    work = WorkDir(tmp_path / "work")
    code = main(
        ["plan", str(phantom_dataset), "--workdir", str(work.root), "-j", "1",
         "--architecture", "unet,attention_unet,unetpp"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    plans = json.loads(work.plans.read_text())
    configs = plans["configurations"]
    expected = {
        "2d": "unet", "3d_fullres": "unet",
        "2d_attention_unet": "attention_unet", "3d_fullres_attention_unet": "attention_unet",
        "2d_unetpp": "unetpp", "3d_fullres_unetpp": "unetpp",
    }  # fmt: skip
    assert {n: c["network"]["architecture"] for n, c in configs.items()} == expected
    # one spacing, one data folder: every configuration reads 'fullres', preprocessed once
    assert {c["data_identifier"] for c in configs.values()} == {"fullres"}
    assert sorted(p.name for p in (work.root / "preprocessed").iterdir()) == ["fullres"]
    # each is sized by its own network's memory estimate: UNet++ keeps more activations than U-Net
    from autoseg.planning.plans import Plans

    typed = Plans.load(work.plans)
    for name, c in typed.configurations.items():
        est = memory.estimate_step_bytes(c.network, c.patch_size, c.batch_size, 2, 3)
        assert c.estimated_memory_gb == round(est / 1024**3, 3), name
    assert (
        typed.configurations["3d_fullres_unetpp"].estimated_memory_gb
        > typed.configurations["3d_fullres"].estimated_memory_gb
    )
    out = capsys.readouterr().out
    assert "3d_fullres_attention_unet" in out and "2d_unetpp" in out


def test_lowres_stages_are_named_per_architecture_and_get_their_own_data_when_the_spacing_differs():
    # 300x512x512 at 1 mm: every architecture gets a lowres stage, at a spacing set by its own patch
    fp = _fingerprint([[1, 1, 1]] * 20, [[300, 512, 512]] * 20)
    plans = make_plans(_spec(), fp, architecture=["unet", "segnet"])
    c = plans.configurations
    assert set(c) == {
        "2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres",
        "2d_segnet", "3d_fullres_segnet", "3d_lowres_segnet", "3d_cascade_fullres_segnet",
    }  # fmt: skip
    assert c["3d_cascade_fullres_segnet"].previous_stage == "3d_lowres_segnet"
    assert c["3d_cascade_fullres"].previous_stage == "3d_lowres"
    assert c["3d_lowres"].data_identifier == "lowres"
    assert c["3d_lowres_segnet"].spacing != c["3d_lowres"].spacing
    assert c["3d_lowres_segnet"].data_identifier == "lowres_segnet"
    assert {
        c[n].data_identifier for n in ("2d_segnet", "3d_fullres_segnet", "3d_cascade_fullres_segnet")
    } == {"fullres"}


def test_share_data_keeps_one_folder_per_spacing():
    fp = _fingerprint([[1, 1, 1]] * 4, [[40, 64, 64]] * 4)
    plans = make_plans(_spec(), fp)
    a = plans.configurations["3d_fullres"]
    from dataclasses import replace

    b = replace(a, name="b", network=replace(a.network, architecture="segnet"))
    c = replace(a, name="c", spacing=[2.0, 2.0, 2.0], network=replace(a.network, architecture="fcn8s"))
    reasons: list[str] = []
    out = share_data({"a": a, "b": b, "c": c}, reasons)
    assert [out[n].data_identifier for n in "abc"] == ["fullres", "fullres", "fullres_fcn8s"]
    assert len(reasons) == 1 and reasons[0].startswith("c: spacing 2×2×2 mm")


def test_a_time_budget_gives_each_architecture_its_own_budget_configuration():
    from autoseg.planning.budget import BudgetRequest
    from tests.planning.test_budget import _fingerprint as _budget_fingerprint
    from tests.planning.test_budget import _spec as _budget_spec
    from tests.planning.test_budget import proxy_timer

    fp = _budget_fingerprint((1, 1, 1), (64, 64, 64), thickness_mm=8.0)
    log: list = []
    request = BudgetRequest(10, "cpu", proxy_timer(10.0, 64**3, log))
    plans = make_plans(_budget_spec(), fp, architecture=("unet", "segnet"), budget=request)
    unet, segnet = plans.configurations["3d_budget"], plans.configurations["3d_budget_segnet"]
    assert unet.network.architecture == "unet" and segnet.network.architecture == "segnet"
    assert unet.budget is not None and segnet.budget is not None
    # each budget configuration's reason names it (the budget rule's "3d_budget:" line, renamed)
    assert any(r.startswith("3d_budget: 10 min on cpu") for r in plans.reasons)
    assert any(r.startswith("3d_budget_segnet: 10 min on cpu") for r in plans.reasons)
    # the proxy timer times both alike: the same rung (1.5 mm), so one 'budget' data folder for both
    assert unet.spacing == segnet.spacing == [1.5, 1.5, 1.5]
    assert unet.data_identifier == segnet.data_identifier == "budget"
