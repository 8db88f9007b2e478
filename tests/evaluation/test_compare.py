"""``autoseg compare`` on hand-built WORK folders: plans with a few configurations, per-fold validation
summaries whose per-case Dice are set here, training logs written by hand. The table's figures and the
Wilcoxon p-values are worked out by hand below and checked against scipy."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import wilcoxon

from autoseg import api
from autoseg.cli import main
from autoseg.compare import compare, paired_test
from autoseg.layout import WorkDir
from autoseg.planning import speed
from autoseg.planning.planner import make_plans
from autoseg.planning.plans import Plans
from tests.planning.test_planning import _fingerprint, _spec
from tests.test_bad_input import _error_line

CASES = [f"c{i}" for i in range(6)]
SPLITS = [
    {"train": [], "val": CASES[0:2]},
    {"train": [], "val": CASES[2:4]},
    {"train": [], "val": CASES[4:6]},
]
# U-Net, the best: liver and tumour Dice per case; c4 has no tumour in either map (Dice undefined)
LIVER = [0.90, 0.80, 0.85, 0.95, 0.70, 0.88]
TUMOUR = [0.60, 0.50, 0.70, 0.65, None, 0.55]
HD95 = [2.0, 4.0, 3.0, 1.0, 6.0, 2.0]
# SegNet: every case lower by a different amount -> all six differences negative
SEGNET_DROP = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]
# UNet++: mixed signs, and no prediction for c5 (only the five common cases are paired)
UNETPP_SHIFT = [+0.01, -0.02, +0.03, -0.04, -0.05]


def _per_case(liver, tumour, hd95) -> dict[str, list[dict]]:
    """Per-case rows as evaluate writes them (``summary.json``'s ``per_case``), by case."""
    out = {}
    for case, lv, tu, hd in zip(CASES, liver, tumour, hd95):
        out[case] = [
            {"case": case, "label": "liver", "dice": lv, "hd95": hd, "nsd": lv},
            {"case": case, "label": "tumour", "dice": tu, "hd95": None if tu is None else 2 * hd, "nsd": tu},
        ]
    return out


def _write_fold(work: WorkDir, config: str, k: int, rows: dict[str, list[dict]], log=None, settings=None):
    folder = work.validation(config, k)
    folder.mkdir(parents=True)
    per_case = [r for case in SPLITS[k]["val"] if case in rows for r in rows[case]]
    summary = {"per_case": per_case, "mean_dice_labels": ["liver", "tumour"]}
    (folder / "summary.json").write_text(json.dumps(summary))
    (work.fold_dir(config, k) / "checkpoint_final.pt").write_bytes(b"")
    if log is not None:
        (work.fold_dir(config, k) / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    if settings is not None:
        (work.fold_dir(config, k) / "settings.json").write_text(json.dumps(settings))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> WorkDir:
    """Plans with five configurations of narrow networks: U-Net, SegNet and UNet++ with every fold
    validated, FCN-8s with fold 2 trained but not validated, and 2d never trained."""
    work = WorkDir(tmp_path_factory.mktemp("compare") / "work")
    work.root.mkdir()
    fp = _fingerprint([[1, 1, 1]] * 6, [[32, 48, 48]] * 6)
    planned = make_plans(_spec(labels=("liver", "tumour")), fp)
    base = planned.configurations["3d_fullres"]
    narrow = replace(base.network, features_per_stage=[4 * 2**i for i in range(base.network.n_stages)])
    configs = {"2d": planned.configurations["2d"]}
    for name, arch in [("3d_fullres", "unet"), ("3d_fullres_segnet", "segnet"), ("3d_fullres_unetpp", "unetpp"),
                       ("3d_fullres_fcn8s", "fcn8s")]:  # fmt: skip
        configs[name] = replace(base, name=name, network=replace(narrow, architecture=arch))
    replace(planned, configurations=configs).save(work.plans)
    (work.splits).write_text(json.dumps(SPLITS))
    epoch = {
        "seconds": 10.0,
        "train_seconds": 8.0,
        "iterations": 4,
        "peak_memory_gb": 1.5,
        "peak_memory_of": "cpu_rss",
    }
    old_epoch = {"seconds": 9.0, "train_seconds": 7.5}  # a log from before 'iterations': settings.json says 5
    unet = _per_case(LIVER, TUMOUR, HD95)
    segnet = _per_case(
        [v - d for v, d in zip(LIVER, SEGNET_DROP)],
        [None if v is None else v - d for v, d in zip(TUMOUR, SEGNET_DROP)],
        HD95,
    )
    unetpp = _per_case(
        [v + d for v, d in zip(LIVER, UNETPP_SHIFT)],
        [None if v is None else v + d for v, d in zip(TUMOUR, UNETPP_SHIFT)],
        HD95,
    )
    assert "c5" not in unetpp  # five shifts for six cases: zip stops at c4
    for k in range(3):
        _write_fold(work, "3d_fullres", k, unet, log=[{"epoch": 1, **epoch}, {"epoch": 2, **epoch}])
        _write_fold(work, "3d_fullres_segnet", k, segnet, log=[{"epoch": 1, **old_epoch}],
                    settings={"train": {"iters_per_epoch": 5, "loss": "tversky(alpha=0.3,beta=0.7)",
                                        "optimizer": "adam", "schedule": "plateau", "initial_lr": 0.001}})  # fmt: skip
        _write_fold(work, "3d_fullres_unetpp", k, unetpp)
    for k in range(2):
        _write_fold(work, "3d_fullres_fcn8s", k, unet)
    fold2 = work.fold_dir("3d_fullres_fcn8s", 2)
    fold2.mkdir(parents=True)
    (fold2 / "checkpoint_final.pt").write_bytes(b"")
    return work


@pytest.fixture(scope="module")
def result(work):
    return compare(work)


def test_every_trained_configuration_is_listed_and_the_untrained_one_is_not(result):
    assert [r.name for r in result.rows] == [
        "3d_fullres", "3d_fullres_segnet", "3d_fullres_unetpp", "3d_fullres_fcn8s"
    ]  # fmt: skip
    assert [r.architecture for r in result.rows] == ["unet", "segnet", "unetpp", "fcn8s"]
    assert result.structures == ["liver", "tumour"] and result.num_folds == 3


def test_scores_per_structure_are_the_case_means_with_the_spread_of_the_fold_means(result):
    unet = result.row("3d_fullres")
    liver = unet.scores["liver"]["dice"]
    assert liver.mean == pytest.approx(5.08 / 6)
    assert liver.fold_means == pytest.approx((0.85, 0.90, 0.79))
    assert liver.fold_sd == pytest.approx(np.std([0.85, 0.90, 0.79], ddof=1))
    tumour = unet.scores["tumour"]["dice"]  # c4 undefined: left out of the mean and of fold 2's mean
    assert tumour.mean == pytest.approx(3.0 / 5) and tumour.fold_means == pytest.approx((0.55, 0.675, 0.55))
    assert unet.scores["liver"]["hd95"].mean == pytest.approx(3.0)
    assert unet.scores["tumour"]["hd95"].mean == pytest.approx(2 * (2 + 4 + 3 + 1 + 2) / 5)
    assert unet.scores["liver"]["nsd"].mean == pytest.approx(liver.mean)
    assert unet.mean_dice == pytest.approx((5.08 / 6 + 0.6) / 2)
    # per-case Dice: the mean over the structures where it is defined (c4: liver alone)
    assert unet.case_dice == pytest.approx(
        {"c0": 0.75, "c1": 0.65, "c2": 0.775, "c3": 0.8, "c4": 0.70, "c5": 0.715}
    )


def test_best_is_the_highest_mean_dice_and_each_other_is_tested_against_it(result):
    assert result.best == "3d_fullres"
    segnet = result.row("3d_fullres_segnet")
    # n = 6, every difference negative: W+ = 0, and only "all negative" or "all positive" of the 2**6 equally
    # likely sign patterns are as extreme -> exact two-sided p = 2 / 64
    assert segnet.n_pairs == 6 and segnet.p_value == pytest.approx(2 / 64)
    best = result.row("3d_fullres")
    x = [segnet.case_dice[c] for c in CASES]
    assert segnet.p_value == pytest.approx(wilcoxon(x, [best.case_dice[c] for c in CASES]).pvalue)
    assert segnet.median_difference == pytest.approx(-0.035)


def test_only_cases_present_in_both_are_paired(result):
    unetpp = result.row("3d_fullres_unetpp")
    # c5 has no UNet++ prediction: 5 pairs, differences +.01 -.02 +.03 -.04 -.05 -> W+ = 1 + 3 = 4. Sign
    # patterns with W+ <= 4 (subsets of the ranks 1..5): {}, 1, 2, 3, 12, 4, 13 = 7 of 32 -> p = 2 * 7 / 32
    assert unetpp.n_pairs == 5 and unetpp.p_value == pytest.approx(14 / 32)
    best = result.row("3d_fullres")
    common = CASES[:5]
    expected = wilcoxon([unetpp.case_dice[c] for c in common], [best.case_dice[c] for c in common]).pvalue
    assert unetpp.p_value == pytest.approx(expected)


def test_a_configuration_with_missing_folds_is_listed_with_the_reason_and_not_tested(result):
    fcn = result.row("3d_fullres_fcn8s")
    assert not fcn.complete and fcn.folds == (0, 1)
    assert fcn.problem == "fold 2 of 3 not validated (trained: 2; rerun train with --resume)"
    assert fcn.p_value is None and fcn.mean_dice is None and fcn.scores == {}


def test_cost_comes_from_the_plans_and_the_training_logs(work, result):
    plans = Plans.load(work.plans)
    for r in result.rows:
        c = plans.configuration(r.name)
        assert r.cost.parameters == plans.parameter_count(r.name)
        flops = speed.step_flops(c.network, c.patch_size, 1, plans.num_outputs, False)
        assert r.cost.flops_per_step == flops * c.batch_size
    unet = result.row("3d_fullres").cost
    assert unet.seconds_per_iteration == pytest.approx(8.0 / 4)
    assert unet.peak_memory_gb == 1.5 and unet.peak_memory_of == "cpu_rss"
    assert unet.training_minutes_per_fold == pytest.approx(20 / 60)
    segnet = result.row("3d_fullres_segnet").cost  # iterations from settings.json: 7.5 s / 5
    assert segnet.seconds_per_iteration == pytest.approx(1.5) and segnet.peak_memory_gb is None
    assert result.row("3d_fullres_unetpp").cost.seconds_per_iteration is None  # no log


def test_files_are_written_atomically_with_the_table(work, result):
    folder = work.root / "compare"
    assert sorted(p.name for p in folder.iterdir()) == ["compare.csv", "compare.md", "compare.png"]
    assert (folder / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["configuration"]: r for r in csv.DictReader((folder / "compare.csv").open())}
    assert rows["3d_fullres"]["status"] == "best"
    assert float(rows["3d_fullres_segnet"]["p_value_vs_best"]) == pytest.approx(0.03125)
    assert rows["3d_fullres_segnet"]["n_pairs"] == "6"
    assert [rows[n]["n_cases"] for n in ("3d_fullres", "3d_fullres_unetpp", "3d_fullres_fcn8s")] == [
        "6",
        "5",
        "",
    ]
    assert float(rows["3d_fullres"]["dice_liver_mean"]) == pytest.approx(5.08 / 6)
    assert rows["3d_fullres_fcn8s"]["status"].startswith("fold 2 of 3 not validated")
    assert rows["3d_fullres_fcn8s"]["p_value_vs_best"] == ""
    md = (folder / "compare.md").read_text()
    assert "| 3d_fullres * |" in md and "0.031 (6)" in md and "- 3d_fullres_fcn8s: fold 2 of 3" in md
    assert "Wilcoxon" in md
    # the recipe each trained with (a variant's, or overridden options), from the folds' settings.json
    recipe = "tversky(alpha=0.3,beta=0.7), optimizer adam, schedule plateau, initial_lr 0.001"
    assert rows["3d_fullres_segnet"]["recipe"] == recipe and rows["3d_fullres"]["recipe"] == ""
    assert f"- 3d_fullres_segnet: {recipe}" in md and "- 3d_fullres: not recorded" in md


def test_paired_test_edge_cases():
    assert paired_test([0.5, 0.6], [0.5, 0.6]) == 1.0  # no difference at all
    with pytest.raises(ValueError):
        paired_test([], [])


def test_cli_prints_the_table(work, capsys):
    assert main(["compare", str(work.root)]) == 0
    out = capsys.readouterr().out
    assert "3d_fullres_segnet" in out and "0.031 (6)" in out and "0.847 ± 0.055" in out
    assert "left out of the tests: 3d_fullres_fcn8s: fold 2 of 3 not validated" in out


def test_cli_refuses_a_work_without_trained_configuration(work, tmp_path, capfd):
    empty = WorkDir(tmp_path / "empty")
    empty.root.mkdir()
    (empty.plans).write_bytes(work.plans.read_bytes())
    code = main(["compare", str(empty.root)])
    captured = capfd.readouterr()
    line = _error_line(code, captured.err)
    assert str(empty.root) in line and "no trained configuration to compare" in line
    assert not (empty.root / "compare").exists()
    code = main(["compare", str(tmp_path / "nothing")])
    assert "no plans.json" in _error_line(code, capfd.readouterr().err)


def test_api_compare_without_writing(work):
    result = api.compare(work.root, write=False)
    assert result.best == "3d_fullres" and result.files == {}


def test_cli_refuses_a_broken_validation_summary_in_one_line(work, tmp_path, capfd):
    import shutil

    copy = WorkDir(tmp_path / "work")
    shutil.copytree(work.root, copy.root)
    broken = copy.validation("3d_fullres_segnet", 1) / "summary.json"
    broken.write_text(json.dumps({"per_case": [{"label": "liver", "dice": 0.5}]}))  # no "case"
    line = _error_line(main(["compare", str(copy.root)]), capfd.readouterr().err)
    assert str(broken) in line and "not a validation summary" in line
    broken.write_text("{not json")
    line = _error_line(main(["compare", str(copy.root)]), capfd.readouterr().err)
    assert str(broken) in line


def test_folds_compares_on_those_folds_only_and_writes_beside_the_full_comparison(work, capfd):
    """--folds 1,0: only folds 0 and 1 count, so FCN-8s (fold 2 not validated) is complete and tested; the
    cases and fold means are those of the two folds; the files go to compare/folds_0_1/."""
    sub = compare(work, folds=[1, 0])
    assert sub.fold_ids == (0, 1) and sub.num_folds == 2 and sub.total_folds == 3
    unet = sub.row("3d_fullres")
    assert unet.scores["liver"]["dice"].mean == pytest.approx((0.90 + 0.80 + 0.85 + 0.95) / 4)
    assert unet.scores["liver"]["dice"].fold_means == pytest.approx((0.85, 0.90))
    assert set(unet.case_dice) == {"c0", "c1", "c2", "c3"}
    fcn = sub.row("3d_fullres_fcn8s")  # the same per-case rows as U-Net: a tie, U-Net first in plans order
    assert fcn.complete and fcn.mean_dice == pytest.approx(unet.mean_dice)
    assert sub.best == "3d_fullres" and fcn.p_value == 1.0 and fcn.n_pairs == 4
    folder = work.compare_dir / "folds_0_1"
    assert set(sub.files.values()) == {folder / "compare.md", folder / "compare.csv", folder / "compare.png"}
    assert "with all 2 compared folds (0, 1 of 3) validated" in (folder / "compare.md").read_text()
    assert main(["compare", str(work.root), "--folds", "0"]) == 0
    assert "best: 3d_fullres" in capfd.readouterr().out
    for bad, expected in (("3", "has 3 folds, numbered 0 to 2"), ("0,x", "expected fold numbers")):
        line = _error_line(main(["compare", str(work.root), "--folds", bad]), capfd.readouterr().err)
        assert "--folds" in line and expected in line
