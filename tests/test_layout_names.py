"""WorkDir owns every name in a WORK folder (issue 14): checkpoint and log names, the fold list (from
``num_folds``) and the discovery of trained folds are spelled in ``autoseg/layout.py`` only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from autoseg import api
from autoseg.errors import AutosegError
from autoseg.layout import MAX_FOLDS, WorkDir, fold_names, fold_range
from autoseg.settings import TrainSettings
from tests.test_bad_input import _error_line, _run

ROOT = Path(__file__).resolve().parents[1] / "autoseg"
FOLD_FILE_NAMES = {
    WorkDir.CHECKPOINT_LATEST,
    WorkDir.CHECKPOINT_BEST,
    WorkDir.CHECKPOINT_FINAL,
    WorkDir.FOLD_SETTINGS,
    WorkDir.LOG,
    WorkDir.PROGRESS,
}


def _code_strings(tree: ast.AST):
    """String constants that are not docstrings, with their line (f-string parts included)."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.value, node.lineno


def test_fold_folder_names_are_spelled_only_in_layout():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "layout.py":
            continue
        source = path.read_text()
        for text, line in _code_strings(ast.parse(source)):
            if (
                any(name in text for name in FOLD_FILE_NAMES if name.endswith(".pt"))
                or text in FOLD_FILE_NAMES
            ):
                found.append(f"{path.relative_to(ROOT.parent)}:{line}: {text!r}")
        for m in re.finditer(r"range\(5\)|\"0\", \"1\", \"2\", \"3\", \"4\"|\(0, 1, 2, 3, 4\)", source):
            found.append(f"{path.relative_to(ROOT.parent)}:{source.count(chr(10), 0, m.start()) + 1}: {m[0]}")
    assert not found, "use WorkDir's names and fold list (autoseg/layout.py):\n" + "\n".join(found)


def test_fold_list_follows_num_folds():
    assert fold_names() == [str(k) for k in range(MAX_FOLDS)] == ["0", "1", "2", "3", "4"]
    assert fold_names(3) == ["0", "1", "2"] and fold_range(3) == "0-2" and fold_range() == "0-4"
    assert TrainSettings().num_folds == MAX_FOLDS
    with pytest.raises(AutosegError, match="num_folds"):
        TrainSettings(num_folds=MAX_FOLDS + 1)


def test_trained_folds_is_one_discovery(tmp_path):
    work = WorkDir(tmp_path)
    assert work.trained_folds("2d") == []
    work.checkpoint("2d", "all").parent.mkdir(parents=True)
    work.checkpoint("2d", "all").write_bytes(b"x")
    assert work.trained_folds("2d") == ["all"]  # only when no numbered fold is trained
    for k in (3, 0):
        work.checkpoint("2d", k).parent.mkdir(parents=True)
        work.checkpoint("2d", k).write_bytes(b"x")
    work.checkpoint("2d", 1, WorkDir.CHECKPOINT_LATEST).parent.mkdir(parents=True)
    work.checkpoint("2d", 1, WorkDir.CHECKPOINT_LATEST).write_bytes(b"x")  # unfinished: not trained
    assert work.trained_folds("2d") == [0, 3]
    assert work.checkpoint("2d", 3) == tmp_path / "results" / "2d" / "fold_3" / "checkpoint_final.pt"
    assert work.validation("2d", "all") == tmp_path / "results" / "2d" / "fold_all" / "validation"


def test_train_fold_range_comes_from_num_folds(tmp_path, capfd):
    settings = tmp_path / "three.toml"
    settings.write_text("[train]\nnum_folds = 3\n")
    assert api.folds_to_train("all-folds", settings) == ["0", "1", "2"]
    assert api.folds_to_train("all-folds") == ["0", "1", "2", "3", "4"]
    assert api.folds_to_train(2, settings) == ["2"] and api.folds_to_train("all", settings) == ["all"]
    code, _, err = _run(capfd, "train", tmp_path / "work", "2d", "3", "--config-file", settings)
    assert "fold must be 0-2, 'all-folds' or 'all', got '3'" in _error_line(code, err)
    with pytest.raises(AutosegError, match="fold must be 0-2 or 'all', got '4'"):
        api.train(tmp_path / "work", "2d", 4, config_file=settings, device="cpu")
    assert not (tmp_path / "work").exists()
    code, _, err = _run(capfd, "train", tmp_path / "work", "2d", "5")
    assert "fold must be 0-4, 'all-folds' or 'all', got '5'" in _error_line(code, err)
