"""``autoseg compare WORK``: every trained configuration side by side, with a paired test against the best.

What is read (nothing is trained or predicted here)::

    WORK/plans.json                                 architecture, network, patch and batch of each configuration
    WORK/splits.json                                the folds (their number and validation cases)
    WORK/results/<config>/fold_<k>/validation/summary.json   per-case metrics ("per_case") of the fold
    WORK/results/<config>/fold_<k>/log.jsonl        per epoch: seconds, train_seconds, iterations, peak memory
    WORK/results/<config>/fold_<k>/settings.json    iters_per_epoch (for logs written before ``iterations``)

What is written, each file atomically: ``WORK/compare/compare.md`` (the tables, how to read them),
``compare.csv`` (one row per configuration) and ``compare.png`` (per-case mean Dice of each configuration).

Rules
-----
* **Listed**: every configuration of the plans with at least one fold folder. It is *complete* when every
  fold of ``splits.json`` has ``validation/summary.json``; otherwise it is listed with the reason (``folds 3,
  4 not validated``) and left out of the best and of the tests.
* **Cases**: as find-best, each case is taken from the lowest fold that validates it.
* **Structures**: the summary's ``mean_dice_labels`` (the labels, or the regions of region-based plans).
* **Scores per structure**: Dice, HD95 (mm) and NSD, mean over the cases where defined (the pooled
  cross-validation mean) and the standard deviation of the per-fold means (ddof 1; the spread between folds).
* **mean Dice** of a configuration: the mean over structures of their mean Dice, as find-best's score.
  **Best**: the complete configuration with the highest mean Dice (ties: plans order).
* **Per-case Dice** (what the test pairs): the mean over structures of the case's Dice, structures where it
  is undefined (both masks empty) left out; a case with none defined has no value.
* **Paired test**: for each other complete configuration, the two-sided Wilcoxon signed-rank test
  (:func:`scipy.stats.wilcoxon`, zero differences dropped as Wilcoxon did; scipy's ``method="auto"``: the
  exact distribution for at most 50 pairs without ties or zeros, with ties or zeros an exhaustive permutation
  test up to 13 pairs, else the normal approximation) of the per-case Dice differences over the cases both
  have a value for. All differences zero: p = 1. ``n`` pairs are reported: with 5 or fewer, no
  difference can reach p < 0.05 (the smallest two-sided exact p is 2 / 2**n).
* **Cost**: parameters and FLOPs of a training step (batch × forward and backward of one sample, measured on
  the network on the meta device, :func:`autoseg.planning.speed.step_flops`); measured seconds per
  iteration (training time over iterations, all folds), peak memory (largest over epochs and folds, with what
  was measured: GPU allocation or CPU process RSS) and training time (mean per fold) from the logs.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError
from autoseg.jsonio import JSONFileError, read_json, temp_path_for, write_text
from autoseg.layout import WorkDir
from autoseg.planning.plans import Plans
from autoseg.selection import load_splits

METRICS = ("dice", "hd95", "nsd")
"""The metrics compared per structure (their units: ratio, mm, ratio)."""
ALPHA = 0.05


@dataclass(frozen=True)
class Score:
    """One metric of one structure: mean over cases, per-fold means, their standard deviation (ddof 1)."""

    mean: float | None
    fold_means: tuple[float | None, ...]
    fold_sd: float | None


@dataclass(frozen=True)
class Cost:
    """What a configuration costs: from the plans (parameters, FLOPs) and from the training logs."""

    parameters: int
    flops_per_step: int
    batch_size: int
    patch_size: tuple[int, ...]
    seconds_per_iteration: float | None = None
    peak_memory_gb: float | None = None
    peak_memory_of: str = ""
    training_minutes_per_fold: float | None = None


@dataclass(frozen=True)
class Row:
    """One configuration of the comparison. ``problem`` is None when every fold is validated."""

    name: str
    architecture: str
    dim: int
    folds: tuple[int, ...]
    problem: str | None
    cost: Cost
    scores: dict[str, dict[str, Score]] = field(default_factory=dict)  # structure -> metric -> score
    mean_dice: float | None = None
    case_dice: dict[str, float] = field(default_factory=dict)
    p_value: float | None = None
    n_pairs: int = 0
    median_difference: float | None = None  # this configuration's per-case Dice minus the best's
    recipe: str = ""  # loss, optimizer and schedule the folds trained with (their settings.json)

    @property
    def complete(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class Comparison:
    """Every listed configuration (plans order), the best's name, the structures and the number of folds."""

    rows: list[Row]
    best: str | None
    structures: list[str]
    num_folds: int  # the folds compared (all of splits.json, or those of ``folds``)
    files: dict[str, Path] = field(default_factory=dict)
    fold_ids: tuple[int, ...] = ()  # which folds were compared
    total_folds: int = 0  # folds in splits.json

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)


def compare(
    work: WorkDir | str | os.PathLike, write: bool = True, folds: Sequence[int] | None = None
) -> Comparison:
    """Compare every trained configuration of ``work`` (see the module docstring) and, with ``write``, write
    ``WORK/compare/compare.{md,csv,png}``. With ``folds`` (fold numbers of ``splits.json``) only those folds
    count: a configuration is complete when they are validated, and the cases are theirs; the files then go
    to ``WORK/compare/folds_<k>_<k>/`` so the full comparison is not overwritten. :class:`AutosegError`
    naming WORK when no configuration has a trained fold, or a fold that ``splits.json`` does not have;
    :class:`PlansError` for missing or invalid plans or splits."""
    work = work if isinstance(work, WorkDir) else WorkDir(Path(work))
    plans = Plans.load(work.plans)
    names = [n for n in plans.configurations if work.fold_dir(n, 0).parent.is_dir() and _fold_dirs(work, n)]
    if not names:
        raise AutosegError(
            f"{work.root}: no trained configuration to compare (no results/<config>/fold_<k> folder); "
            f"train with 'autoseg train {work.root} CONFIG FOLD'"
        )
    splits = [[str(c) for c in f["val"]] for f in load_splits(work)]
    fold_ids = _fold_ids(work, folds, len(splits))
    rows = [_row(work, plans, name, splits, fold_ids) for name in names]
    complete = [r for r in rows if r.complete and r.mean_dice is not None]
    best = max(complete, key=lambda r: r.mean_dice, default=None)  # max keeps the first of equal scores
    if best is not None:
        rows = [_tested(r, best) if r.complete and r is not best else r for r in rows]
    structures = list(dict.fromkeys(s for r in rows for s in r.scores))
    result = Comparison(
        rows,
        best.name if best else None,
        structures,
        len(fold_ids),
        fold_ids=fold_ids,
        total_folds=len(splits),
    )
    if write:
        subset = len(fold_ids) < len(splits)
        folder = work.compare_dir / ("folds_" + "_".join(map(str, fold_ids))) if subset else work.compare_dir
        result.files.update(write_comparison(result, folder))
    return result


def _fold_ids(work: WorkDir, folds: Sequence[int] | None, total: int) -> tuple[int, ...]:
    """The folds to compare: every fold of ``splits.json``, or ``folds`` (sorted, each once), checked."""
    if folds is None:
        return tuple(range(total))
    chosen = tuple(sorted(set(folds)))
    bad = [k for k in chosen if not isinstance(k, int) or not 0 <= k < total]
    if not chosen or bad:
        what = "no fold" if not chosen else f"fold {bad[0]}"
        raise AutosegError(f"--folds: {what}: {work.splits} has {total} folds, numbered 0 to {total - 1}")
    return chosen


def _read(path: Path):
    """A JSON file autoseg wrote; :class:`AutosegError` naming it when it cannot be read or decoded."""
    try:
        return read_json(path)
    except JSONFileError:
        raise
    except ValueError as exc:  # malformed JSON
        raise AutosegError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise AutosegError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _fold_dirs(work: WorkDir, config: str) -> list[int]:
    """The numbered folds of ``config`` that have a folder."""
    root = work.fold_dir(config, 0).parent
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("fold_") and p.name[5:].isdigit():
            out.append(int(p.name[5:]))
    return sorted(out)


RECIPE_SHOWN = ("loss", "optimizer", "schedule", "initial_lr")


def _recipe(work: WorkDir, name: str, folds: Sequence[int]) -> str:
    """``loss, optimizer, schedule, lr`` the first of ``folds`` trained with (its ``settings.json``), so that
    recipe variants (``autoseg variant``) and overridden options show; empty when no fold recorded one."""
    for k in folds:
        path = work.fold_dir(name, k) / WorkDir.FOLD_SETTINGS
        if path.is_file():
            train = _read(path).get("train", {})
            return ", ".join(f"{train[key]}" if key == "loss" else f"{key} {train[key]}"
                             for key in RECIPE_SHOWN if key in train)  # fmt: skip
    return ""


def _row(work: WorkDir, plans: Plans, name: str, splits: list[list[str]], fold_ids: Sequence[int]) -> Row:
    """Cost, scores and per-case Dice of configuration ``name`` (scores only if every fold of ``fold_ids`` is
    validated)."""
    cfg = plans.configuration(name)
    validated = [k for k in fold_ids if (work.validation(name, k) / WorkDir.SUMMARY).is_file()]
    missing = [k for k in fold_ids if k not in validated]
    problem = None
    if missing:
        trained = [k for k in missing if work.checkpoint(name, k).is_file()]
        parts = [f"fold{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {len(splits)} not "
                 "validated"]  # fmt: skip
        if trained:
            parts.append(f"(trained: {', '.join(map(str, trained))}; rerun train with --resume)")
        problem = " ".join(parts)
    folds = validated or _fold_dirs(work, name)
    cost = _cost(work, plans, name, folds)
    row = Row(
        name,
        cfg.network.architecture,
        cfg.dim,
        tuple(validated),
        problem,
        cost,
        recipe=_recipe(work, name, folds),
    )
    if problem is not None:
        return row
    per_case, fold_of, structures = _per_case(work, name, fold_ids)
    scores = {s: {m: _score(per_case, fold_of, s, m, fold_ids) for m in METRICS} for s in structures}
    dice = [scores[s]["dice"].mean for s in structures if scores[s]["dice"].mean is not None]
    return replace(
        row,
        scores=scores,
        mean_dice=float(np.mean(dice)) if dice else None,
        case_dice=_case_dice(per_case, structures),
    )


def _per_case(
    work: WorkDir, name: str, fold_ids: Sequence[int]
) -> tuple[dict[str, dict[str, dict]], dict[str, int], list[str]]:
    """(``{case: {structure: metrics}}``, ``{case: fold}``, structures) from the folds' validation summaries;
    a case validated by several folds is taken from the lowest."""
    per_case: dict[str, dict[str, dict]] = {}
    fold_of: dict[str, int] = {}
    structures: list[str] = []
    for k in fold_ids:
        path = work.validation(name, k) / WorkDir.SUMMARY
        try:
            summary = _read(path)
            rows = summary["per_case"]
            names = summary.get("mean_dice_labels") or [r["label"] for r in rows]
            seen = {str(r["case"]) for r in rows}
        except (KeyError, TypeError, AttributeError) as exc:
            raise AutosegError(f"{path}: not a validation summary ({type(exc).__name__}: {exc})") from None
        structures.extend(s for s in names if s not in structures)
        for case in sorted(seen - set(fold_of)):
            fold_of[case] = k
        for r in rows:
            if fold_of.get(str(r["case"])) == k:
                per_case.setdefault(str(r["case"]), {})[str(r["label"])] = r
    return dict(sorted(per_case.items())), fold_of, structures


def _value(metrics: Mapping | None, metric: str) -> float | None:
    v = None if metrics is None else metrics.get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _score(
    per_case: dict, fold_of: dict[str, int], structure: str, metric: str, fold_ids: Sequence[int]
) -> Score:
    """``metric`` of ``structure``: mean over the cases where defined, per-fold means and their SD."""
    values = {c: _value(m.get(structure), metric) for c, m in per_case.items()}
    defined = [v for v in values.values() if v is not None]
    fold_means = []
    for k in fold_ids:
        vs = [v for c, v in values.items() if v is not None and fold_of.get(c) == k]
        fold_means.append(float(np.mean(vs)) if vs else None)
    present = [v for v in fold_means if v is not None]
    return Score(
        mean=float(np.mean(defined)) if defined else None,
        fold_means=tuple(fold_means),
        fold_sd=float(np.std(present, ddof=1)) if len(present) >= 2 else None,
    )


def _case_dice(per_case: dict, structures: Sequence[str]) -> dict[str, float]:
    """Per case, the mean Dice over the structures where it is defined (cases with none are left out)."""
    out = {}
    for case, metrics in per_case.items():
        vs = [v for s in structures if (v := _value(metrics.get(s), "dice")) is not None]
        if vs:
            out[case] = float(np.mean(vs))
    return out


def paired_test(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of the pairs ``(x[i], y[i])`` (zero differences dropped);
    1.0 when every difference is zero. ``ValueError`` for no pairs or unequal lengths."""
    from scipy.stats import wilcoxon

    if len(x) != len(y) or not len(x):
        raise ValueError(f"paired_test needs pairs: got {len(x)} and {len(y)} values")
    d = np.asarray(x, float) - np.asarray(y, float)
    if not np.any(d != 0):
        return 1.0
    with warnings.catch_warnings():  # few pairs: scipy warns that the approximation is rough
        warnings.simplefilter("ignore")
        return float(wilcoxon(x, y, zero_method="wilcox", alternative="two-sided").pvalue)


def _tested(row: Row, best: Row) -> Row:
    """``row`` with its paired test against ``best`` over the cases both have a per-case Dice for."""
    common = sorted(set(row.case_dice) & set(best.case_dice))
    if not common:
        return row
    x = [row.case_dice[c] for c in common]
    y = [best.case_dice[c] for c in common]
    return replace(
        row,
        p_value=paired_test(x, y),
        n_pairs=len(common),
        median_difference=float(np.median(np.subtract(x, y))),
    )


def _cost(work: WorkDir, plans: Plans, name: str, folds: Sequence[int]) -> Cost:
    """Parameters and FLOPs per step from the plans; seconds per iteration, peak memory and training time
    from the folds' ``log.jsonl`` (None where no fold logged them)."""
    from autoseg.planning import speed

    cfg = plans.configuration(name)
    flops = speed.step_flops(
        cfg.network, cfg.patch_size, plans.input_channels(name), plans.num_outputs, plans.region_based
    )
    train_s, iters, peaks, kinds, minutes = 0.0, 0, [], set(), []
    for k in folds:
        records = _read_log(work.fold_dir(name, k) / WorkDir.LOG)
        per_epoch = _iters_per_epoch(work.fold_dir(name, k) / WorkDir.FOLD_SETTINGS)
        if records:
            minutes.append(sum(_value(r, "seconds") or 0.0 for r in records) / 60)
        for r in records:
            n = r.get("iterations") or per_epoch
            if _value(r, "train_seconds") is not None and n:
                train_s, iters = train_s + r["train_seconds"], iters + int(n)
            if _value(r, "peak_memory_gb") is not None:
                peaks.append(r["peak_memory_gb"])
                kinds.add(str(r.get("peak_memory_of", "")))
    return Cost(
        parameters=plans.parameter_count(name),
        flops_per_step=int(flops * cfg.batch_size),
        batch_size=cfg.batch_size,
        patch_size=tuple(cfg.patch_size),
        seconds_per_iteration=train_s / iters if iters else None,
        peak_memory_gb=max(peaks) if peaks else None,
        peak_memory_of="/".join(sorted(kinds)),
        training_minutes_per_fold=float(np.mean(minutes)) if minutes else None,
    )


def _read_log(path: Path) -> list[dict]:
    """The epochs of a ``log.jsonl`` (a line cut short by a kill is skipped); [] if there is none."""
    if not path.is_file():
        return []
    import json

    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _iters_per_epoch(path: Path) -> int | None:
    """``iters_per_epoch`` of a fold's ``settings.json`` (None if unreadable)."""
    try:
        n = read_json(path)["train"]["iters_per_epoch"]
    except (JSONFileError, KeyError, TypeError, ValueError, OSError):
        return None
    return int(n) if isinstance(n, int) and n > 0 else None


# ---- tables (the markdown file and the CLI print the same rows)

COST_COLUMNS = (
    "configuration", "architecture", "parameters", "GFLOP/step", "patch × batch", "s/iteration",
    "peak memory GB", "train min/fold", "folds",
)  # fmt: skip


def cost_rows(result: Comparison) -> list[tuple[str, ...]]:
    """One row per configuration under :data:`COST_COLUMNS`."""
    rows = []
    for r in result.rows:
        c = r.cost
        peak = _fmt(c.peak_memory_gb, ".3g") + (f" ({c.peak_memory_of})" if c.peak_memory_of else "")
        rows.append((
            _mark(r, result), r.architecture, f"{c.parameters / 1e6:.2f} M", f"{c.flops_per_step / 1e9:.4g}",
            f"{'×'.join(map(str, c.patch_size))} × {c.batch_size}", _fmt(c.seconds_per_iteration, ".3g"),
            peak, _fmt(c.training_minutes_per_fold, ".3g"), f"{len(r.folds)}/{result.num_folds}",
        ))  # fmt: skip
    return rows


def score_columns(result: Comparison) -> tuple[str, ...]:
    per = [f"{m.upper() if m != 'dice' else 'Dice'} {s}" for s in result.structures for m in METRICS]
    return ("configuration", "mean Dice", "cases", *per, "p vs best (n)", "median Δ Dice")


def score_rows(result: Comparison) -> list[tuple[str, ...]]:
    """One row per configuration under :func:`score_columns`: ``mean ± SD of the fold means`` per metric."""
    rows = []
    for r in result.rows:
        if not r.complete:
            rows.append(
                (_mark(r, result), "—", "—", *("—" for _ in result.structures for _ in METRICS), "—", "—")
            )
            continue
        cells = []
        for s in result.structures:
            for m in METRICS:
                score = r.scores.get(s, {}).get(m)
                digits = ".2f" if m == "hd95" else ".3f"
                cells.append(_pm(score, digits))
        rows.append(
            (
                _mark(r, result),
                _fmt(r.mean_dice, ".4f"),
                str(len(r.case_dice)),
                *cells,
                _test(r, result),
                _fmt(r.median_difference, "+.4f"),
            )
        )
    return rows


SUMMARY_COLUMNS = ("configuration", "params", "GFLOP", "s/it", "GB", "min", "Dice", "p (n)")
"""The narrow form's columns: GFLOP per training step, peak memory GB, training minutes per fold, mean Dice."""
STRUCTURE_COLUMNS = ("configuration", "structure", "Dice", "HD95 mm", "NSD")


def summary_rows(result: Comparison) -> list[tuple[str, ...]]:
    """The narrow form for a terminal: cost and mean Dice with the test, one row per configuration."""
    rows = []
    for r in result.rows:
        c = r.cost
        rows.append((
            _mark(r, result), _count(c.parameters), f"{c.flops_per_step / 1e9:.3g}",
            _fmt(c.seconds_per_iteration, ".3g"), _fmt(c.peak_memory_gb, ".3g"),
            _fmt(c.training_minutes_per_fold, ".3g"), _fmt(r.mean_dice, ".4f"), _test(r, result),
        ))  # fmt: skip
    return rows


def structure_rows(result: Comparison) -> list[tuple[str, ...]]:
    """The narrow form for a terminal: one row per complete configuration and structure."""
    rows = []
    for r in result.rows:
        for s in result.structures if r.complete else []:
            scores = r.scores.get(s, {})
            rows.append(
                (_mark(r, result), s, *(_pm(scores.get(m), ".2f" if m == "hd95" else ".3f") for m in METRICS))
            )
    return rows


def terminal_tables(result: Comparison) -> list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]]:
    """``(title, columns, rows)`` of the two tables ``autoseg compare`` prints (narrow enough for 80 columns)."""
    return [
        (
            "configurations (GFLOP per training step, peak GB, training min per fold; p (n pairs): Wilcoxon "
            "signed-rank test of per-case Dice vs the best *)",
            SUMMARY_COLUMNS,
            summary_rows(result),
        ),
        (
            "cross-validation per structure (mean over cases ± SD of the fold means)",
            STRUCTURE_COLUMNS,
            structure_rows(result),
        ),
    ]


def _test(r: Row, result: Comparison) -> str:
    if not r.complete:
        return "—"
    if r.name == result.best:
        return "best"
    return "no common case" if r.p_value is None else f"{r.p_value:.2g} ({r.n_pairs})"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _mark(r: Row, result: Comparison) -> str:
    return r.name + (" *" if r.name == result.best else "")


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _pm(score: Score | None, spec: str) -> str:
    if score is None or score.mean is None:
        return "n/a"
    return format(score.mean, spec) + ("" if score.fold_sd is None else f" ± {format(score.fold_sd, spec)}")


# ---- files

READING = (
    "How to read it: each configuration's per-case Dice (mean over the structures) is paired with the best's on "
    "the same cases, and the two-sided Wilcoxon signed-rank test asks whether the differences are centred on "
    "zero. A small p (below {alpha}) says the gap in Dice is unlikely to be chance across these cases; a large "
    "p says these cases do not show a difference, not that there is none. With n ≤ 5 pairs no p can fall "
    "below 0.05. Testing several configurations against the same best multiplies the chances of one small p "
    "by luck (Bonferroni: compare each p with {alpha} / number of tests). The cases are those of one dataset; "
    "the spread between folds (± SD of the fold means) shows how much a single fold's figure may move."
)


def write_comparison(result: Comparison, folder: Path) -> dict[str, Path]:
    """``compare.md``, ``compare.csv`` and ``compare.png`` in ``folder``, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    md = write_text(folder / "compare.md", markdown(result))
    table = write_text(folder / "compare.csv", csv_text(result))
    png = plot_comparison(result, folder / "compare.png")
    return {"md": md, "csv": table, "png": png}


def markdown(result: Comparison) -> str:
    """The comparison as a markdown document: cost table, score table, what was left out, how to read it."""
    complete = [r for r in result.rows if r.complete]
    best = result.row(result.best) if result.best else None
    lines = [
        "# autoseg compare",
        "",
        f"{len(result.rows)} trained configuration(s), {len(complete)} with all {result.num_folds} "
        + (
            f"compared folds ({', '.join(map(str, result.fold_ids))} of {result.total_folds}) "
            if result.fold_ids and len(result.fold_ids) < result.total_folds
            else "folds "
        )
        + "validated; best: "
        + (
            f"**{best.name}** (mean Dice {best.mean_dice:.4f})"
            if best
            else "none (no complete configuration)"
        ),
        "",
        "## Cost",
        "",
        *_md_table(COST_COLUMNS, cost_rows(result)),
        "",
        "Parameters and GFLOP per training step (batch × forward and backward, measured on the network) come "
        "from the plans; seconds per iteration, peak memory (cuda: GPU memory allocated; cpu_rss: the "
        "training process's resident set) and training time from the folds' log.jsonl.",
        "",
        "## Cross-validation",
        "",
        "Mean over the cases of every fold ± standard deviation of the per-fold means; HD95 in mm. "
        "p: two-sided Wilcoxon signed-rank test of the per-case Dice against the best's (n pairs); "
        "median Δ Dice: this configuration's per-case Dice minus the best's.",
        "",
        *_md_table(score_columns(result), score_rows(result)),
        "",
    ]
    lines += ["## Recipes (what the folds trained with)", ""]
    lines += [f"- {r.name}: {r.recipe or 'not recorded'}" for r in result.rows] + [""]
    left_out = [r for r in result.rows if not r.complete]
    if left_out:
        lines += ["## Left out of the best and the tests", ""]
        lines += [f"- {r.name}: {r.problem}" for r in left_out] + [""]
    lines += [READING.format(alpha=ALPHA), ""]
    return "\n".join(lines)


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    out = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return out


def csv_text(result: Comparison) -> str:
    """One row per configuration; numbers unformatted, empty where undefined."""
    head = [
        "configuration", "architecture", "dim", "status", "folds_validated", "parameters", "flops_per_step",
        "batch_size", "patch_size", "seconds_per_iteration", "peak_memory_gb", "peak_memory_of",
        "training_minutes_per_fold", "mean_dice", "n_cases", "p_value_vs_best", "n_pairs", "median_dice_difference",
        "recipe",
    ]  # fmt: skip
    head += [f"{m}_{s}_{x}" for s in result.structures for m in METRICS for x in ("mean", "fold_sd")]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for r in result.rows:
        c = r.cost
        status = "best" if r.name == result.best else ("complete" if r.complete else r.problem)
        values = [
            r.name, r.architecture, r.dim, status, " ".join(map(str, r.folds)), c.parameters, c.flops_per_step,
            c.batch_size, "x".join(map(str, c.patch_size)), c.seconds_per_iteration, c.peak_memory_gb,
            c.peak_memory_of, c.training_minutes_per_fold, r.mean_dice, len(r.case_dice) if r.complete else None,
            r.p_value, r.n_pairs or None,
            r.median_difference, r.recipe or None,
        ]  # fmt: skip
        for s in result.structures:
            for m in METRICS:
                score = r.scores.get(s, {}).get(m)
                values += [None, None] if score is None else [score.mean, score.fold_sd]
        w.writerow(["" if v is None else v for v in values])
    return buf.getvalue()


def plot_comparison(result: Comparison, path: Path) -> Path:
    """Per-case mean Dice of every complete configuration: a box per configuration with the cases as dots
    (jittered with a fixed seed), the best in orange, each other's p-value against it above its box."""
    from matplotlib.figure import Figure

    rows = [r for r in result.rows if r.complete and r.case_dice]
    fig = Figure(figsize=(max(6.0, 1.2 * len(rows) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    for i, r in enumerate(rows):
        values = list(r.case_dice.values())
        color = "tab:orange" if r.name == result.best else "tab:blue"
        ax.boxplot([values], positions=[i], widths=0.5, showfliers=False)
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=12, color=color, alpha=0.7, zorder=3)
        label = "best" if r.name == result.best else ("" if r.p_value is None else f"p={r.p_value:.2g}")
        ax.annotate(label, (i, 1.02), ha="center", fontsize="small", xycoords=("data", "axes fraction"))
    ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("per-case Dice (mean over structures)")
    ax.set_title("cross-validation, per case", pad=18)
    if not rows:
        ax.text(0.5, 0.5, "no configuration with every fold validated", ha="center", transform=ax.transAxes)
    tmp = temp_path_for(path, ".png")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
