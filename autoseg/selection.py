"""find-best: pick the configuration, or pair of configurations, with the best cross-validation Dice.

Paths in WORK (:meth:`WorkDir.crossval`, :attr:`WorkDir.inference_instructions`)::

    WORK/results/crossval/<name>/                 cross-validation predictions of one configuration (hard
                                                  links to results/<name>/fold_k/validation/<case><ending>) or
                                                  of an ensemble ``ensemble__A__B``; summary.json, per_case.csv
    WORK/results/crossval/<best>/postprocessed/   the best's predictions after the chosen postprocessing,
                                                  with summary.json
    WORK/inference_instructions.json              what ``autoseg predict`` should run (InferenceInstructions)

Rules
-----
* **Candidates**: every configuration of the plans (or of ``configs``) whose every fold of ``splits.json`` has
  ``validation/summary.json``. Others are *skipped* with the reason, e.g. ``fold 3 not trained``. A cascade's
  lowres stage is a candidate like any other.
* **Cases**: the union of the folds' validation cases; a case validated by several folds (fewer cases than
  folds) is taken from the lowest such fold, for single configurations and ensembles alike.
* **Score**: ``mean_dice`` of the candidate's cross-validation ``summary.json``: the mean over the foreground
  labels (the regions, for region-based plans) of each one's mean Dice over cases. ``None`` ranks last.
* **Ensembles**: every pair of candidates, in plans order. Per case the two ``<case>.npz`` probabilities (in
  the label file's array order) are averaged, turned into labels with
  :func:`autoseg.inference.export.probabilities_to_labels` and written with the geometry of the reference in
  ``WORK/gt_segmentations``. A pair with a missing ``.npz`` is skipped with the reason.
* **Best**: highest score. Exactly equal scores go to a single configuration over an ensemble, then to fewer
  networks run at prediction (a cascade stage counts its previous stages too), then to plans order.
* **Postprocessing** of the best: :func:`autoseg.postprocessing.decide_postprocessing`.
* **Calibration** of the best: a temperature fitted on its cross-validation probabilities (an ensemble's
  averaged per case), ECE per structure before and after (:func:`autoseg.evaluation.probabilities.fit_calibration`,
  docs/calibration.md); ``predict`` applies it to the probabilities it saves.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shlex
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError, PlansError
from autoseg.evaluation.calibration import RELEVANT_BAND, describe_zones, zone_temperatures
from autoseg.evaluation.evaluate import evaluate_folders
from autoseg.evaluation.probabilities import fit_calibration
from autoseg.inference.export import probabilities_to_labels
from autoseg.io.dataset import DatasetSpec, load_dataset_json
from autoseg.io.volume import copy_volume, read_header, write_volume
from autoseg.jsonio import JSONFileError, read_json, write_json
from autoseg.layout import MAX_FOLDS, WorkDir, fold_names
from autoseg.planning.plans import Plans
from autoseg.postprocessing import Postprocessing, decide_postprocessing, structure_dice

INSTRUCTIONS_SCHEMA_VERSION = 1
_log = logging.getLogger("autoseg")
ENSEMBLE_PREFIX = "ensemble__"


def crossval_dir(work: WorkDir, name: str) -> Path:
    """``WORK/results/crossval/<name>``: cross-validation predictions of a configuration or an ensemble."""
    return work.crossval(name)


def instructions_path(work: WorkDir) -> Path:
    """``WORK/inference_instructions.json``, written by :func:`find_best`."""
    return work.inference_instructions


def ensemble_name(configs: Sequence[str]) -> str:
    """``ensemble__A__B`` for two configurations, the name itself for one."""
    return configs[0] if len(configs) == 1 else ENSEMBLE_PREFIX + "__".join(configs)


@dataclass(frozen=True)
class Scored:
    """One scored candidate: a configuration or an ensemble (``configs`` has two names)."""

    name: str
    configs: tuple[str, ...]
    networks: int  # networks run at prediction for one fold: a cascade stage counts its previous stages
    mean_dice: float | None
    dice: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "configs": list(self.configs),
            "networks": self.networks,
            "mean_dice": self.mean_dice,
            "dice": dict(self.dice),
        }


def rank(scored: Sequence[Scored]) -> list[Scored]:
    """``scored`` best first: higher ``mean_dice`` (``None`` last), then one configuration before an
    ensemble, then fewer networks, then the given order."""

    def key(item: tuple[int, Scored]) -> tuple:
        index, s = item
        score = -s.mean_dice if s.mean_dice is not None else math.inf
        return (score, len(s.configs), s.networks, index)

    return [s for _, s in sorted(enumerate(scored), key=key)]


@dataclass(frozen=True)
class InferenceInstructions:
    """``WORK/inference_instructions.json``: what to predict with, and how to postprocess.

    ``configs`` (one name, or two to ensemble) with ``folds``; ``postprocessing`` to apply to the label
    maps; ``scores`` of every candidate and ensemble (:meth:`Scored.to_json`) by name; ``skipped``: ``{"name",
    "reason"}`` of configurations and ensembles that were not scored; ``predict``: the command line.
    """

    best: str
    configs: tuple[str, ...]
    folds: tuple[int, ...]
    postprocessing: Postprocessing
    mean_dice: float | None
    mean_dice_postprocessed: float | None
    scores: dict[str, dict]
    skipped: tuple[dict, ...]
    predict: str
    dataset_hash: str
    postprocessing_report: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    """Calibration of predict's probabilities (docs/calibration.md): ``{"temperature": T or {region: T},
    "zones": {"band": int, "temperature": {zone: T} or {region: {zone: T}}} (only when zone temperatures were
    kept; they are then what predict applies), "ece_before": {structure: ECE}, "ece_after": {...},
    "candidates": {...}, "voxels": int, "method": str}``; ``{}`` is the identity (instructions written before
    calibration have none)."""
    mirroring: dict | None = None
    """What test-time mirroring buys (:func:`autoseg.inference.mirroring.choose_mirroring`): ``mirror_axes``
    that predict uses by default; None (older files, ensembles, cascades): predict's own setting."""
    unetpp: dict | None = None
    """UNet++'s inference mode (:func:`autoseg.inference.unetpp_modes.choose_unetpp_mode`): ``inference``
    ("accurate" or "fast") and ``prune_depth`` that predict uses by default, with the Dice and seconds of every
    mode; None (other networks, ensembles, older files): accurate."""
    schema_version: int = INSTRUCTIONS_SCHEMA_VERSION

    @property
    def mirror_axes(self) -> tuple[int, ...] | None:
        return None if self.mirroring is None else tuple(int(a) for a in self.mirroring["mirror_axes"])

    def to_json(self) -> dict:
        return (
            {
                "schema_version": self.schema_version,
                "best": self.best,
                "configs": list(self.configs),
                "folds": list(self.folds),
                "postprocessing": self.postprocessing.to_json(),
                "mean_dice": self.mean_dice,
                "mean_dice_postprocessed": self.mean_dice_postprocessed,
                "scores": self.scores,
                "skipped": [dict(s) for s in self.skipped],
                "predict": self.predict,
                "dataset_hash": self.dataset_hash,
                "postprocessing_report": self.postprocessing_report,
                "calibration": self.calibration,
            }
            | ({} if self.mirroring is None else {"mirroring": self.mirroring})
            | ({} if self.unetpp is None else {"unetpp": self.unetpp})
        )

    @classmethod
    def from_json(cls, d: dict) -> InferenceInstructions:
        version = d.get("schema_version")
        if version != INSTRUCTIONS_SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {version!r} is not supported (expected {INSTRUCTIONS_SCHEMA_VERSION})"
            )
        configs = tuple(str(c) for c in d["configs"])
        if not 1 <= len(configs) <= 2:
            raise ValueError(f"'configs' must name one or two configurations, got {list(configs)}")
        return cls(
            best=str(d["best"]),
            configs=configs,
            folds=tuple(int(k) for k in d["folds"]),
            postprocessing=Postprocessing.from_json(d["postprocessing"]),
            mean_dice=d.get("mean_dice"),
            mean_dice_postprocessed=d.get("mean_dice_postprocessed"),
            scores=dict(d.get("scores", {})),
            skipped=tuple(dict(s) for s in d.get("skipped", [])),
            predict=str(d.get("predict", "")),
            dataset_hash=str(d.get("dataset_hash", "")),
            postprocessing_report=dict(d.get("postprocessing_report", {})),
            calibration=check_calibration(d.get("calibration", {})),
            mirroring=None if d.get("mirroring") is None else dict(d["mirroring"]),
            unetpp=check_unetpp(d.get("unetpp")),
            schema_version=version,
        )


def check_unetpp(unetpp) -> dict | None:
    """The ``unetpp`` entry of inference instructions, checked: None, or ``inference`` accurate/fast with a
    ``prune_depth`` >= 1 (a :class:`ValueError` saying what is wrong)."""
    if unetpp is None:
        return None
    if not isinstance(unetpp, dict) or unetpp.get("inference") not in ("accurate", "fast"):
        raise ValueError(f"'unetpp' must have 'inference' accurate or fast, got {unetpp!r}")
    depth = unetpp.get("prune_depth")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"'unetpp.prune_depth' must be a whole number >= 1, got {depth!r}")
    return dict(unetpp)


def check_calibration(calibration) -> dict:
    """The ``calibration`` entry of inference instructions, checked: ``{}``, or a ``temperature`` that is a
    positive number or ``{region: positive number}`` (a :class:`ValueError` saying what is wrong)."""
    if not isinstance(calibration, dict):
        raise ValueError(f"'calibration' must be an object, got {type(calibration).__name__}")
    if not calibration:
        return {}
    t = calibration.get("temperature")
    values = list(t.values()) if isinstance(t, dict) else [t]
    if not values or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values
    ):
        raise ValueError(
            f"'calibration.temperature' must be a positive number or {{region: number}}, got {t!r}"
        )
    zones = calibration.get("zones")
    if zones is not None:
        if not isinstance(zones, dict) or not isinstance(zones.get("temperature"), dict):
            raise ValueError(
                f"'calibration.zones' must be {{'band': int, 'temperature': {{...}}}}, got {zones!r}"
            )
        band = zones.get("band", RELEVANT_BAND)
        if not isinstance(band, int) or isinstance(band, bool) or band < 0:
            raise ValueError(f"'calibration.zones.band' must be a whole number >= 0, got {band!r}")
        zt = zones["temperature"]
        try:
            if isinstance(next(iter(zt.values()), None), dict):  # region-based: {region: {zone: T}}
                zone_temperatures(zt, True, list(zt))
            else:
                zone_temperatures(zt, False)
        except ValueError as exc:
            raise ValueError(f"'calibration.zones.temperature': {exc}") from None
    return dict(calibration)


def calibration_line(calibration: dict) -> str:
    """One line for find-best's output: the calibration kept, and mean ECE over the structures before and
    after (held-out cases where there were some), or why there is none."""
    if not calibration:
        return "calibration: none (no validation probabilities)"
    kept = calibration.get("kept", "temperature")
    held = calibration.get("ece_held_out") is not None
    where = "held-out cases" if held else "the fitted cases"
    key = "ece_held_out" if held else "ece_after"

    def mean(ece) -> str:
        values = [v for v in (ece or {}).values() if v is not None]
        return f"{sum(values) / len(values):.3f}" if values else "n/a"

    before = mean(calibration.get("ece_before"))
    cands = calibration.get("candidates", {})
    if kept == "identity":
        others = ", ".join(f"{c} {mean(cands[c].get(key))}" for c in ("temperature", "zones") if c in cands)
        return (
            f"calibration: none kept: every fit raised ECE on a structure on {where} (ECE {before}; {others})"
        )
    if kept == "zones":
        what = "zone temperatures (far/outer/inner/inside) " + describe_zones(
            calibration["zones"]["temperature"]
        )
    else:
        t = calibration["temperature"]
        what = "temperature " + (
            ", ".join(f"{k} {float(v):.3g}" for k, v in t.items())
            if isinstance(t, dict)
            else f"{float(t):.3g}"
        )
    return f"calibration: {what}; mean ECE {before} -> {mean(calibration.get(key))} on {where}"


def load_instructions(work: WorkDir) -> InferenceInstructions:
    """Read ``WORK/inference_instructions.json``; :class:`PlansError` naming the file if missing or invalid."""
    path = instructions_path(work)
    if not path.is_file():
        raise PlansError(f"{path}: not found (run 'autoseg find-best {work.root}' first)")
    try:
        return InferenceInstructions.from_json(read_json(path))
    except JSONFileError as exc:  # names the file itself
        raise PlansError(str(exc)) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PlansError(f"{path}: invalid inference instructions ({type(exc).__name__}: {exc})") from None


def find_best(
    work: WorkDir | str | os.PathLike,
    configs: list[str] | None = None,
    workers: int = 2,
    mirror_tolerance: float | None = None,
) -> dict:
    """Score every fully cross-validated configuration and every pair of them, choose the best and its
    postprocessing, and write ``WORK/inference_instructions.json`` (see the module docstring for the rules).

    ``configs`` limits the candidates (default: every configuration of the plans). Returns the written
    instructions (:meth:`InferenceInstructions.to_json`). Raises :class:`AutosegError` naming the WORK folder
    when no configuration has all folds trained, and :class:`PlansError` for unknown configurations or
    missing plans / splits. ``mirror_tolerance`` (Dice, e.g. 0.001): also measure what test-time mirroring
    buys the best single configuration and record the cheapest axes within it (:func:`_mirroring`).
    """
    work = work if isinstance(work, WorkDir) else WorkDir(Path(work))
    plans = Plans.load(work.plans)
    spec = load_dataset_json(work.dataset_json)
    splits = load_splits(work)
    names = list(dict.fromkeys(configs)) if configs else list(plans.configurations)
    for name in names:
        plans.configuration(name)  # unknown names are refused before any work
    case_folds = fold_of_cases(splits)
    candidates, skipped = _candidates(work, names, splits, case_folds, spec.file_ending)
    scored = [_score_config(work, name, plans, case_folds, spec, workers) for name in candidates]
    for a, b in itertools.combinations(candidates, 2):
        problem = _ensemble_problem(work, (a, b), case_folds)
        if problem:
            skipped.append({"name": ensemble_name((a, b)), "reason": problem})
        else:
            scored.append(_score_ensemble(work, (a, b), plans, case_folds, spec, workers))
    best = rank(scored)[0]
    best_dir = crossval_dir(work, best.name)
    pp, report = decide_postprocessing(
        work.gt_segmentations, best_dir, spec, best_dir / "postprocessed", workers
    )
    folds = tuple(range(len(splits)))
    calibration = _calibrate(work, best.configs, case_folds, spec)
    instructions = InferenceInstructions(
        best=best.name,
        configs=best.configs,
        folds=folds,
        postprocessing=pp,
        mean_dice=best.mean_dice,
        mean_dice_postprocessed=report["final"]["mean_dice"],
        scores={s.name: s.to_json() for s in scored},
        skipped=tuple(skipped),
        predict=predict_command(work, best.configs, folds),
        dataset_hash=plans.dataset_hash,
        postprocessing_report=report,
        calibration=calibration,
        mirroring=_mirroring(work, plans, best.configs, case_folds, mirror_tolerance),
        unetpp=_unetpp(work, plans, best.configs, case_folds, mirror_tolerance),
    )
    out = instructions.to_json()
    write_json(instructions_path(work), out)
    return out


def _candidates(work: WorkDir, names, splits, case_folds, ending: str) -> tuple[list[str], list[dict]]:
    """The configurations among ``names`` with every fold validated, and ``{"name", "reason"}`` of the
    others; :class:`AutosegError` when there is none."""
    candidates, skipped = [], []
    for name in names:
        problem = _candidate_problem(work, name, splits, case_folds, ending)
        if problem:
            skipped.append({"name": name, "reason": problem})
        else:
            candidates.append(name)
    if not candidates:
        why = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped)
        raise AutosegError(
            f"{work.root}: no configuration has all {len(splits)} folds trained ({why}); "
            f"train them with 'autoseg train {work.root} CONFIG FOLD'"
        )
    return candidates, skipped


def _calibrate(
    work: WorkDir, configs: tuple[str, ...], case_folds: dict[str, int], spec: DatasetSpec
) -> dict:
    """Fit the temperature of the best (its configurations' probabilities averaged per case) on the
    cross-validation probabilities (:func:`autoseg.evaluation.probabilities.fit_calibration`); ``{}`` (the
    identity) with a warning where a fold has no ``.npz`` probabilities (validated by an older version)."""
    items = []
    for case, k in case_folds.items():
        paths = [_validation(work, c, k) / f"{case}.npz" for c in configs]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            _log.warning(
                "%s: not found; no calibration (predict saves uncalibrated probabilities)", missing[0]
            )
            return {}
        items.append((case, work.gt_segmentations / f"{case}{spec.file_ending}", paths))
    return fit_calibration(items, spec)


def _measurable(work: WorkDir, plans: Plans, configs, case_folds, tolerance: float | None) -> bool:
    """Whether find-best measures a test-time choice (mirroring, UNet++ mode) for ``configs``: a tolerance is
    given, and they are a single, non-cascade configuration whose folds all have their final checkpoint."""
    if tolerance is None or len(configs) != 1 or plans.configuration(configs[0]).previous_stage:
        return False
    return all(work.checkpoint(configs[0], f).is_file() for f in set(case_folds.values()))


def _mirroring(work: WorkDir, plans: Plans, configs, case_folds, tolerance: float | None) -> dict | None:
    """:func:`autoseg.inference.mirroring.choose_mirroring` for a best configuration find-best can measure
    (:func:`_measurable`); None otherwise (predict then keeps its own setting)."""
    if not _measurable(work, plans, configs, case_folds, tolerance):
        return None
    from autoseg.inference.mirroring import choose_mirroring
    from autoseg.inference.predictor import resolve_device

    return choose_mirroring(work, plans, configs[0], case_folds, tolerance, resolve_device("auto"))


def _unetpp(work: WorkDir, plans: Plans, configs, case_folds, tolerance: float | None) -> dict | None:
    """:func:`autoseg.inference.unetpp_modes.choose_unetpp_mode` for a UNet++ best configuration find-best can
    measure (:func:`_measurable`, with the same tolerance as mirroring); else None."""
    if not _measurable(work, plans, configs, case_folds, tolerance):
        return None
    if plans.configuration(configs[0]).network.architecture != "unetpp":
        return None
    from autoseg.inference.predictor import resolve_device
    from autoseg.inference.unetpp_modes import choose_unetpp_mode

    return choose_unetpp_mode(work, plans, configs[0], case_folds, tolerance, resolve_device("auto"))


def predict_command(work: WorkDir, configs: Sequence[str], folds: Sequence[int]) -> str:
    """``autoseg predict WORK INPUT OUTPUT -c A [-c B]``, with ``-f k`` only for folds other than
    ``0 .. MAX_FOLDS - 1``: ``predict`` uses every trained fold among those by default
    (:meth:`WorkDir.trained_folds`), and find-best only picks configurations whose folds are all trained."""
    parts = ["autoseg", "predict", shlex.quote(str(work.root)), "INPUT", "OUTPUT"]
    for c in configs:
        parts += ["-c", shlex.quote(c)]
    if [str(k) for k in folds] != fold_names(MAX_FOLDS):
        for k in folds:
            parts += ["-f", str(k)]
    return " ".join(parts)


def load_splits(work: WorkDir) -> list[dict]:
    """``splits.json``, checked: a list of folds ``{'train': [...], 'val': [...]}``; :class:`PlansError` naming it."""
    path = work.splits
    if not path.is_file():
        raise PlansError(f"{path}: splits.json not found (it is written when the first fold is trained)")
    try:
        splits = read_json(path)
    except JSONFileError as exc:
        raise PlansError(str(exc)) from None
    except ValueError as exc:
        raise PlansError(f"{path}: not valid JSON ({exc})") from None
    if (
        not isinstance(splits, list)
        or not splits
        or not all(isinstance(f, dict) and isinstance(f.get("val"), list) for f in splits)
    ):
        raise PlansError(f"{path}: expected a list of folds like {{'train': [...], 'val': [...]}}")
    return splits


def fold_of_cases(splits: list[dict]) -> dict[str, int]:
    """``{case: fold}``: the lowest fold that validates each case, cases sorted."""
    out: dict[str, int] = {}
    for k, fold in enumerate(splits):
        for case in fold["val"]:
            out.setdefault(str(case), k)
    return dict(sorted(out.items()))


def _validation(work: WorkDir, config: str, fold: int) -> Path:
    return work.validation(config, fold)


def _candidate_problem(
    work: WorkDir, config: str, splits: list[dict], case_folds: dict[str, int], ending: str
) -> str | None:
    """Why ``config`` cannot be scored (``None`` if it can): an untrained fold or a missing prediction."""
    missing = [
        k for k in range(len(splits)) if not (_validation(work, config, k) / WorkDir.SUMMARY).is_file()
    ]
    if missing:
        unvalidated = [k for k in missing if work.checkpoint(config, k).is_file()]
        untrained = [k for k in missing if k not in unvalidated]
        parts = []
        if untrained:
            parts.append(
                f"fold{'s' if len(untrained) > 1 else ''} {', '.join(map(str, untrained))} not trained"
            )
        if unvalidated:
            parts.append(
                f"fold{'s' if len(unvalidated) > 1 else ''} {', '.join(map(str, unvalidated))} trained but not "
                "validated (rerun its train command with --resume)"
            )
        return "; ".join(parts)
    for case, k in case_folds.items():
        if not (_validation(work, config, k) / f"{case}{ending}").is_file():
            return f"fold {k} has no validation prediction for {case} (splits.json changed after training?)"
    return None


def _ensemble_problem(work: WorkDir, configs: tuple[str, ...], case_folds: dict[str, int]) -> str | None:
    for config in configs:
        for case, k in case_folds.items():
            if not (_validation(work, config, k) / f"{case}.npz").is_file():
                return f"{config} fold {k} has no probabilities {case}.npz (validated by an older version?)"
    return None


def _networks(plans: Plans, config: str) -> int:
    previous = plans.configuration(config).previous_stage
    return 1 + (_networks(plans, previous) if previous else 0)


def _score_config(
    work: WorkDir, config: str, plans: Plans, case_folds: dict[str, int], spec: DatasetSpec, workers: int
) -> Scored:
    """Collect ``config``'s validation predictions into its crossval folder and score them."""
    out = _fresh(crossval_dir(work, config), spec.file_ending)
    for case, k in case_folds.items():
        name = f"{case}{spec.file_ending}"
        _link_or_copy(_validation(work, config, k) / name, out / name)
    return _evaluate(work, config, (config,), _networks(plans, config), spec, workers)


def _score_ensemble(
    work: WorkDir,
    configs: tuple[str, ...],
    plans: Plans,
    case_folds: dict[str, int],
    spec: DatasetSpec,
    workers: int,
) -> Scored:
    """Average the configurations' probabilities per case, write label maps, score them."""
    name = ensemble_name(configs)
    out = _fresh(crossval_dir(work, name), spec.file_ending)

    def one(item: tuple[str, int]) -> None:
        case, k = item
        _ensemble_case(work, configs, case, k, plans, spec.file_ending, out)

    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        list(pool.map(one, case_folds.items()))
    networks = sum(_networks(plans, c) for c in configs)
    return _evaluate(work, name, configs, networks, spec, workers)


def _ensemble_case(
    work: WorkDir, configs: tuple[str, ...], case: str, fold: int, plans: Plans, ending: str, out: Path
) -> Path:
    """Mean probabilities of ``configs`` for one case → label map with the reference's geometry."""
    reference = work.gt_segmentations / f"{case}{ending}"
    geometry = read_header(reference)
    total: np.ndarray | None = None
    for config in configs:
        path = _validation(work, config, fold) / f"{case}.npz"
        with np.load(path) as z:
            probs = z["probabilities"].astype(np.float32)
        if probs.shape[1:] != geometry.shape or (total is not None and probs.shape != total.shape):
            raise AutosegError(
                f"{path}: probabilities of shape {probs.shape} do not fit the reference {reference} "
                f"{geometry.shape}"
                + ("" if total is None else f" or the other configuration's {total.shape}")
            )
        total = probs if total is None else total + probs
    assert total is not None
    seg = probabilities_to_labels(total / len(configs), plans)
    return write_volume(seg, geometry, out / f"{case}{ending}")


def _evaluate(
    work: WorkDir, name: str, configs: tuple[str, ...], networks: int, spec: DatasetSpec, workers: int
) -> Scored:
    folder = crossval_dir(work, name)
    summary = evaluate_folders(
        work.gt_segmentations, folder, spec, folder / WorkDir.SUMMARY, folder / WorkDir.PER_CASE, workers
    )
    return Scored(name, configs, networks, summary["mean_dice"], structure_dice(summary))


def _fresh(folder: Path, ending: str) -> Path:
    """``folder``, created, without label files of an earlier run (cases may have changed since)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file() and f.name.endswith(ending):
            f.unlink()
    return folder


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (a copy across file systems), replacing ``dst`` atomically.

    Outputs are always written by rename, never in place, so a link never sees a later change of ``src``.
    """
    copy_volume(src, dst, link=True)  # an .mhd/.nhdr header with its data file
