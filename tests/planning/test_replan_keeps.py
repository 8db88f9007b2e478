"""Re-planning a WORK keeps what nothing changed under (a recipe variant of an unchanged source, the
time-budget configuration when no budget is given this time) and warns about trained folds it leaves behind."""

from __future__ import annotations

import logging
from dataclasses import replace

from autoseg import api
from autoseg.layout import WorkDir
from autoseg.planning.plans import BudgetPlan, Plans, carry_over

BUDGET = BudgetPlan(
    minutes=10.0, device="cpu", seconds_per_step=0.9, timing="measured", planned_steps=600,
    iters_per_epoch=24, val_iters=2,
)  # fmt: skip


def _with(plans: Plans, **configs) -> Plans:
    return replace(plans, configurations={**plans.configurations, **configs})


def test_a_variant_of_an_unchanged_source_and_the_budget_configuration_are_kept(planned_phantom):
    new = Plans.load(planned_phantom.plans)
    src = new.configuration("3d_fullres")
    budget = replace(src, name="3d_budget", budget=BUDGET)
    variant = replace(src, name="3d_fullres_ce", recipe={"loss": "ce"})
    budget_variant = replace(budget, name="3d_budget_gdice", recipe={"loss": "gdice"})
    old = _with(new, **{c.name: c for c in (budget, variant, budget_variant)})

    kept, lines = carry_over(old, new, budget_requested=False)
    assert list(kept.configurations) == [*new.configurations, "3d_budget", "3d_fullres_ce", "3d_budget_gdice"]
    assert kept.configuration("3d_fullres_ce") == variant and kept.configuration("3d_budget") == budget
    assert len(lines) == 3 and lines[0].startswith("3d_budget: kept") and lines[0] in kept.reasons

    # a budget asked for this time: the new plans have their own 3d_budget (here: none), the old one is not kept,
    # and neither is the variant of it (its source is gone)
    again, lines = carry_over(old, new, budget_requested=True)
    assert list(again.configurations) == [*new.configurations, "3d_fullres_ce"] and len(lines) == 1


def test_nothing_is_kept_when_the_source_or_the_plan_wide_fields_changed(planned_phantom):
    new = Plans.load(planned_phantom.plans)
    src = new.configuration("3d_fullres")
    variant = replace(src, name="3d_fullres_ce", recipe={"loss": "ce"}, patch_size=[8, 8, 8])  # another source
    assert carry_over(_with(new, **{variant.name: variant}), new, False) == (new, [])
    ok = replace(src, name="3d_fullres_ce", recipe={"loss": "ce"})
    other_data = replace(_with(new, **{ok.name: ok}), dataset_hash="something else")
    assert carry_over(other_data, new, False) == (new, [])
    assert carry_over(None, new, False) == (new, [])


def test_replanning_keeps_a_variant_and_warns_about_trained_folds_it_drops(phantom_dataset, tmp_path, caplog):
    work = WorkDir(tmp_path / "work")
    api.plan(phantom_dataset, work.root, workers=1, configurations=("2d",))
    api.make_variant(work.root, "2d", "2d_ce", loss="ce")
    api.make_variant(work.root, "3d_fullres", "3d_fullres_ce", loss="ce")
    first = Plans.load(work.plans)
    orphan = work.checkpoint("3d_fullres_ce", 0)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"weights")  # a trained fold, as far as re-planning can tell

    with caplog.at_level(logging.INFO, logger="autoseg"):
        again = api.plan(phantom_dataset, work.root, workers=1, configurations=("2d",))
    assert again.configuration("2d_ce") == first.configuration("2d_ce")
    assert again.configuration("3d_fullres_ce") == first.configuration("3d_fullres_ce")
    assert "2d_ce: recipe variant kept from the previous plans" in caplog.text
    assert Plans.load(work.plans).to_json() == again.to_json()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="autoseg"):
        smaller = api.plan(phantom_dataset, work.root, workers=1, configurations=("2d",), gpu_memory_gb=2)
    assert "3d_fullres_ce" not in smaller.configurations  # its source was sized for another memory budget
    assert orphan.read_bytes() == b"weights"  # the trained fold is left where it was
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert warning.startswith("3d_fullres_ce: not in the new plans; ") and "1 trained fold(s)" in warning
