"""One settings path (issue 14, item 4): every default is written once, in the settings dataclasses;
configs/default.toml and the command line's options follow them; cli.py is a thin layer over autoseg.api."""

from __future__ import annotations

import ast
import inspect
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import typer

from autoseg import api, cli
from autoseg.errors import AutosegError
from autoseg.settings import AugmentationSettings, InferenceSettings, TrainSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"train": TrainSettings, "augmentation": AugmentationSettings, "inference": InferenceSettings}


def _defaults(cls) -> dict:
    """Field name → default of a settings dataclass (nested settings tables are sections of their own)."""
    out = {}
    for f in fields(cls):
        if f.default is MISSING:  # a nested settings dataclass: its own [section]
            continue
        out[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
    return out


def _mismatches(data: dict) -> list[str]:
    """How a parsed default.toml differs from the dataclasses: a missing or extra section or key, a value
    other than the dataclass default (an int where the default is a float of the same value is fine)."""
    problems = [
        f"section [{s}] {'missing' if s in SECTIONS else 'unknown'}" for s in set(SECTIONS) ^ set(data)
    ]
    for section, cls in SECTIONS.items():
        want, got = _defaults(cls), data.get(section, {})
        problems += [f"[{section}] {k} missing" for k in sorted(set(want) - set(got))]
        problems += [f"[{section}] {k} is no setting" for k in sorted(set(got) - set(want))]
        for name in sorted(set(want) & set(got)):
            value, have = want[name], got[name]
            same_type = type(have) is type(value) or (isinstance(value, float) and type(have) is int)
            if not same_type or have != value:
                problems.append(f"[{section}] {name} = {have!r}, the dataclass says {value!r}")
    return problems


def _shipped() -> dict:
    return tomllib.loads((ROOT / "configs" / "default.toml").read_text(encoding="utf-8"))


def test_default_toml_spells_every_setting_with_the_dataclass_default():
    """configs/default.toml is checked against the dataclasses rather than generated from them: it is the
    file users copy and read, with a comment on each knob that a generator would have to carry too."""
    assert _mismatches(_shipped()) == []


def test_default_toml_check_finds_a_missing_extra_or_changed_key():
    data = _shipped()
    del data["inference"]["fix_nonfinite"]  # as shipped before issue 14
    data["inference"]["step_size"] = 0.25
    data["train"]["epochs"] = 1000.0  # a float where the setting is a whole number
    data["augmentation"]["p_flip"] = 0.5
    assert sorted(_mismatches(data)) == [
        "[augmentation] p_flip is no setting",
        "[inference] fix_nonfinite missing",
        "[inference] step_size = 0.25, the dataclass says 0.5",
        "[train] epochs = 1000.0, the dataclass says 1000",
    ]


def _command(name: str):
    return typer.main.get_command(cli.app).commands[name]


def _option(command, flag: str):
    return next(p for p in command.params if flag in p.opts)


def test_cli_option_defaults_are_the_settings_defaults():
    predict = _command("predict")
    assert _option(predict, "--step").default == InferenceSettings().step_size
    assert _option(predict, "--compile").default == InferenceSettings().compile
    assert _option(predict, "--precision").default == InferenceSettings().precision == "auto"
    # flags that turn a setting away from its default are off by default (None reaches the settings)
    for flag in ("--no-mirroring", "--no-heap-reuse", "--fix-nonfinite"):
        assert _option(predict, flag).default is False
    train = _command("train")
    for flag, name in (
        ("--epochs", "epochs"),
        ("--iters-per-epoch", "iters_per_epoch"),
        ("--val-iters", "val_iters"),
    ):
        option = _option(train, flag)
        assert option.default is None  # None: the settings' (or the --config-file's) value
        assert f"(default {getattr(TrainSettings(), name)})" in option.help
    for flag in ("--time-budget", "--workers"):
        assert _option(train, flag).default is None
    assert _option(_command("evaluate"), "--tolerance").default == api.DEFAULT_TOLERANCE_MM
    for name in ("plan", "evaluate", "find-best"):
        assert _option(_command(name), "--workers").default == api.DEFAULT_WORKERS
    assert f"(default {api.DEFAULT_GPU_MEMORY_GB:g}," in _option(_command("plan"), "--gpu-memory").help


def test_cli_spells_no_setting_default():
    """No literal default in cli.py equals a setting's default under that setting's option (they come from the
    dataclasses), and api.predict repeats no InferenceSettings field as a keyword argument."""
    tree = ast.parse((ROOT / "autoseg" / "cli.py").read_text(encoding="utf-8"))
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("predict", "train")):
        for arg, default in zip(fn.args.args[-len(fn.args.defaults) :], fn.args.defaults):
            if arg.arg in ("step", "compile_", "precision", "epochs", "iters_per_epoch", "val_iters", "time_budget"):
                assert not isinstance(default, ast.Constant) or default.value is None, arg.arg
    params = set(inspect.signature(api.predict).parameters)
    assert "settings" in params
    assert not params & {f.name for f in fields(InferenceSettings)}


def test_predict_takes_inference_settings(tmp_path):
    with pytest.raises(AutosegError, match="settings: must be InferenceSettings, got dict"):
        api.predict(tmp_path, tmp_path, tmp_path / "out", settings={"step_size": 0.5})
    with pytest.raises(TypeError):
        api.predict(tmp_path, tmp_path, tmp_path / "out", step_size=0.5)  # no keyword settings any more
    assert not (tmp_path / "out").exists()


def test_cli_imports_only_the_api():
    """cli.py imports autoseg.api and nothing else of autoseg (lazy imports inside functions included)."""
    tree = ast.parse((ROOT / "autoseg" / "cli.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            imported |= {f"{base}.{a.name}" if base == "autoseg" else base for a in node.names}
    assert {m for m in imported if m.split(".")[0] == "autoseg"} == {"autoseg.api"}


@pytest.mark.parametrize("module", ["cli.py", "api.py"])
def test_functions_stay_short_or_say_why(module):
    """Functions in cli.py and api.py stay under about 60 lines; a longer one says why in its docstring."""
    tree = ast.parse((ROOT / "autoseg" / module).read_text(encoding="utf-8"))
    long = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > 60 and "long because" not in (ast.get_docstring(node) or ""):
                long.append(f"{node.name}: {lines} lines")
    assert long == []


def test_all_folds_loop_lives_in_the_api(tmp_path, monkeypatch, capsys):
    """``train WORK CONFIG all-folds``: api.train_folds skips a finished fold (unless --resume/--overwrite)
    and trains the others in order; the CLI only prints what each FoldRun says."""
    from autoseg.cli import main
    from autoseg.jsonio import write_json
    from autoseg.layout import WorkDir

    work = WorkDir(tmp_path / "work")
    finished = work.fold_dir("3d_fullres", 1) / "checkpoint_final.pt"
    finished.parent.mkdir(parents=True)
    finished.write_bytes(b"")
    calls = []

    def fake_train(workdir, config, fold, **kwargs):
        calls.append((fold, kwargs["overwrite"], kwargs["epochs"]))
        fold_dir = work.fold_dir(config, fold)
        write_json(fold_dir / "validation" / "summary.json", {"mean": {"a": {"dice": 0.5}}, "mean_dice": 0.5})
        return fold_dir

    monkeypatch.setattr(api, "train", fake_train)
    assert main(["train", str(work.root), "3d_fullres", "all-folds", "--epochs", "3"]) == 0
    text = capsys.readouterr().out
    assert [c[0] for c in calls] == ["0", "2", "3", "4"] and calls[0][1:] == (False, 3)
    squeezed = "".join(text.split())  # the console wraps long lines at its width
    assert "".join(f"fold 1: finished earlier ({finished}), skipped".split()) in squeezed
    assert text.count("mean Dice 0.5000") == 4 and text.count("results in ") == 4
    calls.clear()
    assert main(["train", str(work.root), "3d_fullres", "all-folds", "--overwrite"]) == 0
    assert [c[0] for c in calls] == ["0", "1", "2", "3", "4"] and calls[0][1:] == (True, None)
