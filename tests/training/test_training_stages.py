"""Training as a composition (issue 14): the time budget type, training without the final validation, the
final validation as its own stage, and the shape of the code (short functions, no validation in training/)."""

from __future__ import annotations

import ast
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from autoseg import api, validation
from autoseg.checkpoint_io import load_checkpoint
from autoseg.errors import AutosegError
from autoseg.layout import WorkDir
from autoseg.settings import InferenceSettings, TrainSettings
from autoseg.training.budget import TimeBudget
from autoseg.training.loop import train_fold
from autoseg.training.schedule import budget_epochs, poly_lr

CPU = torch.device("cpu")
NO_TTA = InferenceSettings(mirroring=False)
PACKAGE = Path(__file__).resolve().parents[2] / "autoseg"


def test_time_budget_fraction_expiry_and_epochs_that_fit():
    budget = TimeBudget.from_minutes(1.0, used_s=15.0)
    assert budget.limited and budget.limit_s == 60.0
    assert budget.used_fraction() == 0.25
    assert TimeBudget(60.0, used_s=90.0).used_fraction() == 1.0  # past the end: the rate stays at 0
    assert not budget.expired(time.perf_counter())  # 15 s used, the epoch just started
    assert budget.expired(time.perf_counter() - 45.0)  # 15 s + 45 s of this epoch
    assert budget.epochs_that_fit(3, 1000) == budget_epochs(60.0, 15.0, 3, 1000) == 12
    assert budget.too_coarse_for(15.1) and not budget.too_coarse_for(15.0)
    budget.add(5.0)
    assert budget.used_s == 20.0
    none = TimeBudget.from_minutes(0.0)
    assert not none.limited and not none.expired(time.perf_counter() - 1e9)


@pytest.mark.parametrize("used", [0.0, 1e-9, 0.1, 7.3, 19.999999, 20.0, 20.5, 1e6])
def test_the_learning_rate_on_the_clock_is_the_old_formula_bit_for_bit(used):
    """poly_lr at the budget's used fraction equals poly_lr(initial, seconds used, budget seconds)."""
    budget = TimeBudget.from_minutes(1 / 3, used_s=used)
    assert poly_lr(0.01, budget.used_fraction(), 1.0, 0.9) == poly_lr(0.01, used, 1 / 3 * 60, 0.9)


@pytest.fixture()
def work_copy(planned_phantom, tmp_path) -> WorkDir:
    dst = tmp_path / "work"
    shutil.copytree(planned_phantom.root, dst, ignore=shutil.ignore_patterns("results"))
    return WorkDir(dst)


def test_training_alone_then_validation_as_the_next_stage(work_copy):
    """train_fold writes the checkpoints and no validation; resuming the finished fold through the API trains
    nothing more and runs only the final validation; once validated, a resume leaves everything alone."""
    settings = TrainSettings(epochs=1, iters_per_epoch=1, val_iters=1, seed=3, loader_workers=0)
    done = train_fold(work_copy, "3d_fullres", 0, settings, CPU)
    fold = work_copy.fold_dir("3d_fullres", 0)
    assert done.folder == fold and done.trained and done.writer and done.val_ids
    assert (fold / "checkpoint_final.pt").is_file() and not (fold / "validation").exists()
    assert not validation.is_validated(work_copy, "3d_fullres", 0)
    weights = load_checkpoint(fold / "checkpoint_final.pt")["network"]
    log = (fold / "log.jsonl").read_text()

    assert (
        api.train_and_validate(work_copy, "3d_fullres", 0, settings, CPU, resume=True, inference=NO_TTA)
        == fold
    )
    summary = fold / "validation" / "summary.json"
    assert validation.is_validated(work_copy, "3d_fullres", 0)
    assert sorted(p.name for p in (fold / "validation").glob("*.npz")) == sorted(
        f"{c}.npz" for c in done.val_ids
    )
    assert (fold / "log.jsonl").read_text() == log  # no epoch was trained again
    again = load_checkpoint(fold / "checkpoint_final.pt")
    assert again["epoch"] == 1
    for key in weights:
        assert torch.equal(weights[key], again["network"][key])

    def stamps() -> dict[str, int]:  # settings.json records each start, even one with nothing to do
        return {p.name: p.stat().st_mtime_ns for p in fold.rglob("*") if p.name != "settings.json"}

    before = stamps()
    untouched = train_fold(work_copy, "3d_fullres", 0, settings, CPU, resume=True, validated=True)
    assert not untouched.trained
    api.train_and_validate(work_copy, "3d_fullres", 0, settings, CPU, resume=True, inference=NO_TTA)
    assert stamps() == before
    assert json.loads(summary.read_text())["mean"]


def test_validation_settings_are_refused_before_training(work_copy):
    """Mirror axes that mirror nothing in a 2D configuration: refused before anything is written."""
    bad = InferenceSettings(mirror_axes=(2,))
    settings = TrainSettings(epochs=1, iters_per_epoch=1, val_iters=1, loader_workers=0)
    with pytest.raises(AutosegError, match="final validation would mirror nothing"):
        api.train_and_validate(work_copy, "2d", 0, settings, CPU, inference=bad)
    assert not (work_copy.root / "results").exists()


def _functions(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


def test_train_fold_fits_on_a_screen_and_its_helpers_are_short():
    modules = [*sorted((PACKAGE / "training").glob("*.py")), PACKAGE / "validation.py"]
    lengths = {f"{m.name}:{name}": n for m in modules for name, n in _functions(m).items()}
    assert lengths["loop.py:train_fold"] <= 35
    long = {k: n for k, n in lengths.items() if n > 60}
    assert not long, f"functions over 60 lines: {long}"


def _imports(path: Path) -> set[str]:
    """Every module (and ``module.name`` for from-imports) that ``path`` imports."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_training_does_not_run_the_final_validation():
    """No module of training/ reaches the final validation's stage: the validation module, evaluation,
    export of predictions, or the sliding-window predictor."""
    forbidden = ("autoseg.validation", "autoseg.evaluation", "autoseg.inference.export")
    for module in sorted((PACKAGE / "training").glob("*.py")):
        imports = _imports(module)
        assert not [i for i in imports if i.startswith(forbidden)], module.name
        assert "autoseg.inference.predictor.Predictor" not in imports, module.name
