"""Recipe variants (issue 17): a configuration copied under a new name with another loss, optimizer or
schedule, so that recipes are trained, validated and compared in one WORK like architectures."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from autoseg import api
from autoseg.errors import AutosegError, PlansError
from autoseg.layout import WorkDir
from autoseg.planning.plans import Plans
from autoseg.settings import TrainSettings
from tests.test_bad_input import _error_line, _run

TVERSKY = "tversky(alpha=0.3,beta=0.7)"


@pytest.fixture
def work(planned_phantom, tmp_path) -> WorkDir:
    w = WorkDir(tmp_path / "work")
    shutil.copytree(planned_phantom.root, w.root)
    return w


def test_a_variant_is_its_source_trained_with_another_recipe(work):
    before = Plans.load(work.plans)
    plans = api.make_variant(work.root, "2d", "2d_tversky", loss=TVERSKY, optimizer=None)
    again = Plans.load(work.plans)  # saved
    variant, source = again.configuration("2d_tversky"), again.configuration("2d")
    assert again.schema_version == 3 and plans.configurations.keys() == again.configurations.keys()
    assert variant.recipe == {
        "loss": "tversky(alpha=0.3,beta=0.7)"
    }  # canonical spelling, only what was given
    assert variant.data_identifier == source.data_identifier  # no new preprocessing
    assert (variant.network, variant.patch_size, variant.batch_size) == (
        source.network, source.patch_size, source.batch_size,
    )  # fmt: skip
    assert source == before.configuration("2d") and "recipe" not in json.dumps(source.to_json())
    assert api.plan_defaults(work, "2d_tversky").loss == "tversky(alpha=0.3,beta=0.7)"
    assert api.plan_defaults(work, "2d") is None  # the source keeps today's defaults
    chained = api.make_variant(work.root, "2d_tversky", "2d_tversky_adam", optimizer="adam", initial_lr=1e-3)
    assert chained.configuration("2d_tversky_adam").recipe == {
        "loss": "tversky(alpha=0.3,beta=0.7)", "optimizer": "adam", "initial_lr": 1e-3,
    }  # fmt: skip


@pytest.mark.parametrize(
    "source, name, recipe, message",
    [
        ("2d", "2d_x", {}, "variant 2d_x: no training setting given"),
        ("2d", "3d_fullres", {"loss": "ce"}, "variant 3d_fullres: a configuration of that name exists"),
        ("2d", "2d_x", {"loss": "tversky(alpha=2)"}, "--loss tversky(alpha=2): tversky: alpha=2 must be a number in [0, 1]"),
        ("2d", "2d_x", {"optimizer": "lbfgs"}, "--optimizer lbfgs: must be sgd or adam or adamw"),
        ("2d", "../x", {"loss": "ce"}, "variant ../x: configuration '../x': name '../x' must be a folder name"),
        ("4d", "4d_x", {"loss": "ce"}, "4d"),
    ],
)  # fmt: skip
def test_a_bad_variant_is_refused_and_the_plans_stay(work, source, name, recipe, message):
    text = work.plans.read_text()
    with pytest.raises(AutosegError) as err:
        api.make_variant(work.root, source, name, **recipe)
    assert message in str(err.value)
    assert work.plans.read_text() == text


def test_a_hand_edited_recipe_out_of_range_is_refused_naming_the_configuration(work):
    api.make_variant(work.root, "2d", "2d_focal", loss="focal(gamma=2)")
    d = json.loads(work.plans.read_text())
    d["configurations"]["2d_focal"]["recipe"] = {"loss": "focal(gamma=-1)"}
    work.plans.write_text(json.dumps(d))
    with pytest.raises(
        PlansError, match=r"configuration '2d_focal': recipe loss = 'focal\(gamma=-1\)': focal"
    ):
        Plans.load(work.plans)
    d["configurations"]["2d_focal"]["recipe"] = {"epochs": 3}  # not a recipe setting
    work.plans.write_text(json.dumps(d))
    with pytest.raises(PlansError, match="recipe epochs = 3: not a recipe setting"):
        Plans.load(work.plans)


def test_the_command_line_adds_a_variant_or_says_why_not_in_one_line(work, capfd):
    code, out, _ = _run(capfd, "variant", work.root, "2d", "2d_tversky", "--loss", TVERSKY)
    assert code == 0 and "configuration 2d_tversky: 2d trained with loss = tversky(alpha=0.3,beta=0.7)" in out
    code, _, err = _run(capfd, "variant", work.root, "2d", "2d_y", "--schedule", "step")
    assert "--schedule step" in _error_line(code, err) and "plateau" in err


def test_training_a_variant_uses_its_recipe_and_an_option_still_wins(work):
    from autoseg.training.loop import train_fold

    api.make_variant(work.root, "2d", "2d_tversky", loss=TVERSKY, schedule="cosine")
    defaults = api.plan_defaults(work, "2d_tversky")
    from dataclasses import replace

    settings = replace(defaults, epochs=1, iters_per_epoch=1, val_iters=1, loader_workers=0, schedule="poly")
    train_fold(work, "2d_tversky", "all", settings, torch.device("cpu"))
    recorded = json.loads((work.fold_dir("2d_tversky", "all") / "settings.json").read_text())["train"]
    assert recorded["loss"] == "tversky(alpha=0.3,beta=0.7)" and recorded["schedule"] == "poly"
    assert TrainSettings().loss != recorded["loss"]
