"""Recipes as settings (issue 17): the loss expression parser, class weights from label frequencies, the
optimizers and learning-rate schedules, and the recipe a run records and a resumed run must keep."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from autoseg.errors import AutosegError
from autoseg.fingerprint import CaseFingerprint
from autoseg.loss_spec import LossSpecError, check_for_plans, parse_loss
from autoseg.settings import TrainSettings, load_settings
from autoseg.training.class_weights import balanced_weights, class_voxel_counts
from autoseg.training.run import check_same_recipe, make_optimizer
from autoseg.training.schedule import poly_lr, scheduled_lr


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("dice+ce", "dice+ce"),
        (" Dice + CE ", "dice+ce"),
        ("0.5*tversky(alpha=0.3,beta=0.7)+0.5*focal(gamma=2)", "0.5*tversky(alpha=0.3,beta=0.7)+0.5*focal(gamma=2)"),
        ("tversky", "tversky(alpha=0.3,beta=0.7)"),
        ("focal_tversky(gamma=1)", "focal_tversky(alpha=0.3,beta=0.7,gamma=1)"),
        ("wce+dice", "wce(weights=auto)+dice"),
        ("ce(weights=[1, 2.5, 10])", "ce(weights=[1,2.5,10])"),
        ("2e-1*lovasz+1.0*gdice", "0.2*lovasz+gdice"),
        ("focal()", "focal(gamma=2)"),
    ],
)  # fmt: skip
def test_parse_canonical_spelling(text, canonical):
    expr = parse_loss(text)
    assert expr.text() == canonical
    assert parse_loss(canonical) == expr  # the canonical spelling parses back to the same terms


def test_parse_terms():
    expr = parse_loss("0.5*tversky(alpha=0.3,beta=0.7)+0.5*focal(gamma=2)")
    assert [(t.weight, t.name, dict(t.params)) for t in expr.terms] == [
        (0.5, "tversky", {"alpha": 0.3, "beta": 0.7}),
        (0.5, "focal", {"gamma": 2.0}),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "must be a loss expression"),
        ("dice-ce", "expected the end, found '-'"),
        ("dice*2", "expected the end, found '*'"),
        ("2*", "expected a name, found the end"),
        ("dice(", "expected a name, found the end"),
        ("tversky(alpha)", "expected '=', found ')'"),
        ("tversky(alpha=0.3 beta=0.7)", "expected ',' or ')', found 'beta'"),
        ("focal(gamma=1,gamma=2)", "focal: parameter gamma given twice"),
        ("hausdorff", "unknown loss 'hausdorff'; losses: ce, wce"),
        ("tversky(alpha=1.01)", "tversky: alpha=1.01 must be a number in [0, 1]"),
        ("tversky(beta=-0.5)", "tversky: beta=-0.5 must be a number in [0, 1]"),
        ("tversky(alpha=0,beta=0)", "tversky: alpha + beta must be > 0"),
        ("focal(gamma=-1)", "focal: gamma=-1 must be a number >= 0"),
        ("focal_tversky(gamma=0)", "focal_tversky: gamma=0 must be a number > 0"),
        ("focal(gamma=auto)", "focal: gamma=auto must be a number >= 0"),
        ("ce(weights=[1,0,2])", "ce: weights=[1,0,2] must be auto or a list of numbers > 0"),
        ("ce(weights=3)", "ce: weights=3 must be auto or a list"),
        ("dice(smooth=1)", "dice: unknown parameter 'smooth' (parameters: none)"),
        ("-1*dice", "dice: weight -1 must be a finite number > 0"),
        ("1e999*dice", "dice: weight inf must be a finite number > 0"),
        ("__import__('os')", 'unexpected "\'"'),
    ],
)
def test_parse_refuses_with_what_is_allowed(text, message):
    with pytest.raises(LossSpecError) as exc:
        parse_loss(text)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_check_for_plans():
    check_for_plans(parse_loss("0.5*tversky+0.5*focal+lovasz+gdice+dice_sq+ce"), True, 3)
    check_for_plans(parse_loss("ce(weights=[1,2,3])+wce"), False, 3)
    with pytest.raises(LossSpecError, match="wce needs softmax classes; region-based plans take: ce, dice"):
        check_for_plans(parse_loss("dice+wce"), True, 3)
    with pytest.raises(LossSpecError, match="ce: class weights need softmax classes"):
        check_for_plans(parse_loss("ce(weights=[1,2,3])"), True, 3)
    with pytest.raises(LossSpecError, match="ce: 2 weights given, the plans have 3 classes"):
        check_for_plans(parse_loss("ce(weights=[1,2])"), False, 3)


def test_settings_keep_the_canonical_loss(tmp_path):
    assert TrainSettings().loss == "dice+ce"
    assert TrainSettings(loss="tversky + focal").loss == "tversky(alpha=0.3,beta=0.7)+focal(gamma=2)"
    path = tmp_path / "s.toml"
    path.write_text(
        '[train]\nloss = "0.5*tversky(alpha=0.2,beta=0.8)+0.5*focal(gamma=1)"\noptimizer = "adamw"\n'
    )
    train, _ = load_settings(path, schedule="cosine", warmup_fraction=0.1)
    assert (train.loss, train.optimizer, train.schedule, train.warmup_fraction) == (
        "0.5*tversky(alpha=0.2,beta=0.8)+0.5*focal(gamma=1)",
        "adamw",
        "cosine",
        0.1,
    )
    assert train.to_json()["loss"] == train.loss  # what settings.json records
    with pytest.raises(
        AutosegError, match=r"^--loss focal\(gamma=-1\): focal: gamma=-1 must be a number >= 0$"
    ):
        load_settings(loss="focal(gamma=-1)")


def test_balanced_weights_by_hand():
    # 100 voxels, 3 classes: w_c = 100 / (3 n_c)
    assert balanced_weights([90, 9, 1]) == pytest.approx([100 / 270, 100 / 27, 100 / 3])
    assert balanced_weights([50, 50, 0]) == pytest.approx([2 / 3] * 3)  # 100 / (3 * 50); absent: the largest
    assert balanced_weights([0, 0]) == [1.0, 1.0]


def test_class_voxel_counts_from_the_fingerprint():
    class P:  # what class_voxel_counts reads of the plans
        labels = {"background": 0, "liver": 1, "tumour": 2}
        num_classes = 3

    cases = [
        CaseFingerprint("a", (1, 1, 1), (10, 10, 10), (8, 8, 8), 0.5, {"liver": 100, "tumour": 5}),
        CaseFingerprint("b", (1, 1, 1), (5, 10, 10), (5, 8, 8), 0.6, {"liver": 40, "tumour": 0}),
    ]
    fp = type("F", (), {"cases": cases})()
    assert class_voxel_counts(fp, P) == [1000 - 105 + 500 - 40, 140, 5]


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_schedules_by_hand(schedule):
    lr = lambda f, w=0.0: scheduled_lr(0.01, f, schedule, 0.9, w)  # noqa: E731
    assert lr(0) == pytest.approx(0.01)
    assert lr(1) == pytest.approx(0.0, abs=1e-15)
    half = 0.5**0.9 if schedule == "poly" else 0.5
    assert lr(0.5) == pytest.approx(0.01 * half)
    # warmup over the first 20 %: from a tenth of the rate, linearly, then the decay over the other 80 %
    assert lr(0, 0.2) == pytest.approx(0.001)
    assert lr(0.1, 0.2) == pytest.approx(0.0055)
    assert lr(0.2, 0.2) == pytest.approx(0.01)
    assert lr(0.6, 0.2) == pytest.approx(0.01 * half)
    assert lr(1.5, 0.2) == pytest.approx(0.0, abs=1e-15)


def test_poly_without_warmup_is_todays_poly_bit_for_bit():
    for epoch in range(0, 11):
        assert scheduled_lr(0.01, epoch / 10, "poly", 0.9, 0.0) == poly_lr(0.01, epoch, 10, 0.9)
    assert math.isclose(scheduled_lr(0.01, 0.3, "cosine", 0.9, 0.0), 0.005 * (1 + math.cos(0.3 * math.pi)))


def test_optimizers():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(TrainSettings(), params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.99
    adam = make_optimizer(TrainSettings(optimizer="adam", initial_lr=1e-3), params)
    assert type(adam) is torch.optim.Adam and adam.defaults["lr"] == 1e-3
    adamw = make_optimizer(TrainSettings(optimizer="adamw", weight_decay=0.05), params)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.05


def test_resume_keeps_the_recipe(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"train": {"epochs": 5, "loss": "dice+ce", "optimizer": "sgd"}}))
    same = TrainSettings(epochs=10).to_json()  # other settings may change (more epochs)
    check_same_recipe(path, same)
    with pytest.raises(AutosegError, match="trained with loss = 'dice\\+ce', now 'lovasz'"):
        check_same_recipe(path, TrainSettings(loss="lovasz").to_json())
    # a run recorded before these settings existed trained with the defaults
    path.write_text(json.dumps({"train": {"epochs": 5}}))
    check_same_recipe(path, same)
    with pytest.raises(AutosegError, match="optimizer = 'sgd', now 'adam'"):
        check_same_recipe(path, TrainSettings(optimizer="adam").to_json())


def test_default_loss_of_a_run_is_todays_bit_for_bit(planned_phantom):
    from autoseg.networks.losses import DeepSupervisionLoss, DiceCELoss
    from autoseg.planning.plans import Plans
    from autoseg.training.run import make_loss

    plans = Plans.load(planned_phantom.plans)
    g = torch.Generator().manual_seed(0)
    k = plans.num_outputs
    outputs = [torch.randn(2, k, 16 // 2**i, 16 // 2**i, generator=g) for i in range(3)]
    target = torch.randint(0, k, (2, 1, 16, 16), generator=g)
    today = DeepSupervisionLoss(DiceCELoss(batch_dice=True, ignore_label=plans.ignore_label))
    assert torch.equal(make_loss(plans, True)(outputs, target), today(outputs, target))
    assert torch.equal(
        make_loss(plans, True, "ce+dice", planned_phantom)(outputs, target), today(outputs, target)
    )


def test_weights_auto_come_from_the_fingerprint(planned_phantom):
    from autoseg.fingerprint import Fingerprint
    from autoseg.jsonio import read_json
    from autoseg.planning.plans import Plans
    from autoseg.training.run import make_loss

    plans = Plans.load(planned_phantom.plans)
    loss = make_loss(plans, False, "wce", planned_phantom).loss
    weights = loss.terms[0][2]["weights"]
    fp = Fingerprint.from_json(read_json(planned_phantom.fingerprint))
    counts = class_voxel_counts(fp, plans)
    assert weights.tolist() == pytest.approx([sum(counts) / (len(counts) * n) for n in counts])
    assert weights[0] < 1 < weights[1:].min()  # background is the frequent class
    with pytest.raises(AutosegError, match="weights=auto needs the fingerprint.json"):
        make_loss(plans, False, "wce")


@pytest.mark.parametrize(
    "recipe",
    [
        dict(loss="0.5*tversky(alpha=0.3,beta=0.7)+0.5*focal(gamma=2)", optimizer="adamw", initial_lr=1e-3),
        dict(loss="wce+lovasz+gdice+dice_sq+focal_tversky+0.01*boundary", optimizer="adam", schedule="cosine", warmup_fraction=0.5),
    ],
)  # fmt: skip
def test_a_run_trains_and_records_its_recipe(planned_phantom, tmp_path, recipe):
    import shutil

    from autoseg.layout import WorkDir
    from autoseg.training.loop import train_fold

    work = WorkDir(tmp_path / "work")
    shutil.copytree(planned_phantom.root, work.root)
    settings = TrainSettings(epochs=2, iters_per_epoch=2, val_iters=1, loader_workers=0, **recipe)
    train_fold(work, "2d", "all", settings, torch.device("cpu"))
    folder = work.fold_dir("2d", "all")
    recorded = json.loads((folder / "settings.json").read_text())["train"]
    for key in ("loss", "optimizer", "schedule", "warmup_fraction", "initial_lr"):
        assert recorded[key] == getattr(settings, key)
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(e["train_loss"]) for e in log)
    if recipe.get("warmup_fraction"):  # epoch 1 of 2 warms up from a tenth of the rate; epoch 2 decays
        assert log[0]["lr"] == pytest.approx(0.1 * settings.initial_lr)
        assert log[1]["lr"] == pytest.approx(settings.initial_lr)


def test_make_loss_refuses_what_the_plans_cannot_take(planned_phantom):
    from dataclasses import replace

    from autoseg.planning.plans import Plans
    from autoseg.training.run import make_loss

    plans = Plans.load(planned_phantom.plans)
    with pytest.raises(AutosegError, match=r"setting loss = 'ce\(weights=\[1,2\]\)': ce: 2 weights given"):
        make_loss(plans, False, "ce(weights=[1,2])")
    regional = replace(plans, regions={"all": [1]}, regions_class_order=[1])
    with pytest.raises(AutosegError, match="wce needs softmax classes"):
        make_loss(regional, False, "wce")
    make_loss(regional, False, "lovasz+focal")


def test_schedules_run_on_the_clock_with_a_time_budget():
    from autoseg.training.budget import TimeBudget
    from autoseg.training.loop import _learning_rate
    from autoseg.training.state import RunState

    state = RunState(epoch=1, planned=1000, budget=TimeBudget(limit_s=100.0, used_s=60.0))
    cosine = TrainSettings(schedule="cosine", warmup_fraction=0.2, time_budget_minutes=1)
    # 60 % of the budget used: half of the decay after the 20 % warmup, whatever the epoch count says
    assert _learning_rate(cosine, state) == pytest.approx(0.005)
    state.budget.used_s = 10.0
    assert _learning_rate(cosine, state) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5))
    poly = TrainSettings(time_budget_minutes=1)
    assert _learning_rate(poly, state) == poly_lr(0.01, 0.1, 1.0, 0.9)  # today's rule, unchanged


def test_plateau_lowers_the_rate_after_patience_epochs_without_a_rise():
    from autoseg.training.schedule import MIN_PLATEAU_SCALE, Plateau

    p = Plateau()
    emas = [0.10, 0.20, 0.2005, 0.1990, 0.2009, 0.30, 0.30, 0.30, 0.30, 0.30, 0.30, 0.30]
    lowered = [p.step(v, patience=3, factor=0.5, threshold=0.001) for v in emas]
    # 0.2005, 0.1990 and 0.2009 do not rise 0.001 above 0.20: after the third the rate halves; 0.30 is a
    # new best; then three epochs without a rise halve it again, and three more once more
    assert lowered == [False, False, False, False, True, False, False, False, True, False, False, True]
    assert p.scale == 0.125 and p.best == 0.30 and p.wait == 0
    assert not p.step(None, 3, 0.5, 0.001) and not p.step(math.nan, 3, 0.5, 0.001)  # no average yet: nothing
    floor = Plateau(best=1.0, scale=0.0015)
    assert floor.step(0.5, 1, 0.5, 0.0) and floor.scale == MIN_PLATEAU_SCALE  # never below a thousandth
    assert not floor.step(0.5, 1, 0.5, 0.0) and floor.scale == MIN_PLATEAU_SCALE
    again = Plateau.from_json(json.loads(json.dumps(p.to_json())))  # what a checkpoint keeps
    assert again == p
    assert Plateau.from_json(json.loads(json.dumps(Plateau().to_json()))) == Plateau()
    assert Plateau.from_json(None) == Plateau()  # a checkpoint from before the plateau schedule


def test_plateau_rate_is_the_initial_rate_times_the_scale_after_the_warmup():
    from autoseg.training.budget import TimeBudget
    from autoseg.training.loop import _learning_rate, _step_plateau
    from autoseg.training.state import RunState

    assert scheduled_lr(0.01, 0.5, "plateau", 0.9, 0.0, 0.25) == pytest.approx(0.0025)
    assert scheduled_lr(0.01, 0.05, "plateau", 0.9, 0.1, 0.25) == pytest.approx(0.01 * 0.55)  # warming up
    settings = TrainSettings(schedule="plateau", plateau_patience=2, plateau_factor=0.1)
    state = RunState(epoch=3, planned=10, budget=TimeBudget(limit_s=0.0))
    for ema in (0.5, 0.5, 0.5):
        state.ema = ema
        _step_plateau(settings, state)
    assert _learning_rate(settings, state) == pytest.approx(0.001)
    poly = RunState(epoch=3, planned=10, budget=TimeBudget(limit_s=0.0))
    for ema in (0.5, 0.5, 0.5):
        poly.ema = ema
        _step_plateau(TrainSettings(), poly)  # other schedules keep no plateau bookkeeping
    assert poly.plateau.scale == 1.0


@pytest.mark.parametrize(
    "key, value, allowed",
    [("plateau_patience", 0, ">= 1"), ("plateau_factor", 1.0, "(0, 1)"), ("plateau_factor", 0.0, "(0, 1)"),
     ("plateau_threshold", -0.1, "[0, 1]"), ("schedule", "step", "poly or cosine or plateau")],
)  # fmt: skip
def test_plateau_settings_out_of_range_are_refused(tmp_path, key, value, allowed):
    path = tmp_path / "s.toml"
    path.write_text(f"[train]\n{key} = {json.dumps(value)}\n")
    with pytest.raises(AutosegError, match=rf"\[train\] {key} = .*{re.escape(allowed)}"):
        load_settings(path)
    recorded = json.dumps({"train": {"schedule": "plateau", "plateau_patience": 10}})
    (tmp_path / "settings.json").write_text(recorded)
    with pytest.raises(AutosegError, match="plateau_patience = 10, now 5"):
        check_same_recipe(
            tmp_path / "settings.json", TrainSettings(schedule="plateau", plateau_patience=5).to_json()
        )


def test_a_plateau_run_lowers_its_rate_and_a_resumed_run_continues_from_the_checkpoint(
    planned_phantom, tmp_path
):
    import shutil

    from autoseg.layout import WorkDir
    from autoseg.training.loop import train_fold

    work = WorkDir(tmp_path / "work")
    shutil.copytree(planned_phantom.root, work.root)
    # a threshold of 1 Dice: no epoch ever counts as an improvement, so the rate halves after each epoch but
    # the first (which sets the best)
    plateau = dict(schedule="plateau", plateau_patience=1, plateau_threshold=1.0, plateau_factor=0.5)
    common = dict(iters_per_epoch=2, val_iters=1, loader_workers=0, **plateau)
    train_fold(
        work, "2d", 0, TrainSettings(epochs=3, **common), torch.device("cpu")
    )  # fold 0: a validation EMA
    train_fold(work, "2d", 0, TrainSettings(epochs=4, **common), torch.device("cpu"), resume=True)
    log = [json.loads(line) for line in (work.fold_dir("2d", 0) / "log.jsonl").read_text().splitlines()]
    assert all(e["ema_dice"] is not None for e in log)
    assert [e["lr"] for e in log] == pytest.approx([0.01, 0.01, 0.005, 0.0025])
