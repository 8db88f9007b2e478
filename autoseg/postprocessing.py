"""Connected-component postprocessing: keep only the largest object of a structure, where validation says so.

Components
----------
A *structure* is a set of label values: a label is a one-value tuple ``(2,)``, a region several ``(1, 2, 3)``.
Its mask is ``isin(seg, values)``. Components are found with ``scipy.ndimage.label`` and **full connectivity**
(26 neighbours in 3D: voxels touching at a face, an edge or a corner are one object). This is the cautious
choice: an object is only split off by a gap of background, so a thin or diagonal bridge never gets a part of
the prediction deleted. Voxels of every smaller component become background (0), whatever value they held. If
two components are equally large, the first in ``scipy.ndimage.label`` order (C order of their first voxel)
is kept. An empty mask is left as it is.

The decision rule (:func:`decide_postprocessing`)
-------------------------------------------------
Scores are the per-structure *mean Dice* of :func:`autoseg.evaluation.evaluate.evaluate_folders` over every
scored structure (foreground labels and regions of ``dataset.json``). A structure's Dice *drops* when it
falls by more than :data:`DICE_TOLERANCE` (1e-4); smaller changes are rounding or one voxel in a large
dataset. A mean Dice that is not defined (``None``) before or after never counts as a drop.

1. Baseline: the predictions as they are.
2. Whole foreground (every foreground value as one structure, as nnU-Net tries first): kept if no
   structure's mean Dice drops ("never worse on validation"). A step that changes no voxel of any validation
   case is *not* kept: it has no evidence for it, and on new cases it could only delete (a lesion in two
   parts, say).
3. Then each structure in :func:`autoseg.evaluation.evaluate.structures` order (labels by value, then
   regions), applied on top of what was kept so far: kept if *its own* mean Dice does not drop **and** no
   other structure's mean Dice drops (removing a label's stray blob must not cost another label or region).

:class:`Postprocessing` records the outcome; :func:`apply_postprocessing` replays it in the same order
(whole foreground first, then the structures in the recorded order). This module never imports training:
inference applies the decision to new predictions.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from autoseg.evaluation.evaluate import evaluate_folders, structures
from autoseg.io.dataset import DatasetSpec
from autoseg.io.volume import copy_volume, read_volume, write_volume
from autoseg.jsonio import write_json
from autoseg.layout import WorkDir

DICE_TOLERANCE = 1e-4
"""A mean Dice that falls by more than this counts as a drop."""

CONNECTIVITY = "full (26 neighbours in 3D: face, edge or corner)"

Structures = Mapping[str, Sequence[int]] | Sequence[Sequence[int]]
"""``{name: label values}`` or a list of value tuples; one entry per structure."""

FOREGROUND = "foreground"
"""Name of the whole-foreground step in reports."""


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest fully connected component of a boolean ``mask`` (any dimension) as a boolean array.

    Ties go to the component met first in C order; an empty mask gives an empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    labelled, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(labelled.ravel())[1:]
    return labelled == int(np.argmax(sizes)) + 1


def keep_largest_component(seg: np.ndarray, structures: Structures) -> np.ndarray:
    """A copy of the label map ``seg`` where each structure keeps only its largest connected component.

    ``structures`` is ``{name: values}`` or a list of value tuples; they are processed in the given order,
    each on the result of the previous. Voxels of a structure's smaller components become 0. ``seg`` itself
    is not modified; the result has its shape and dtype.
    """
    out = np.array(seg, copy=True)
    value_sets = structures.values() if isinstance(structures, Mapping) else structures
    for values in value_sets:
        mask = np.isin(out, np.asarray(tuple(values)))
        out[mask & ~largest_component(mask)] = 0
    return out


def keep_largest_foreground(seg: np.ndarray) -> np.ndarray:
    """A copy of ``seg`` keeping only the largest connected component of all foreground (``seg != 0``) together."""
    out = np.array(seg, copy=True)
    mask = out != 0
    out[mask & ~largest_component(mask)] = 0
    return out


@dataclass(frozen=True)
class Postprocessing:
    """What to do to a predicted label map: whole-foreground LCC, then LCC of the named structures in order.

    JSON: ``{"keep_largest_foreground": bool, "keep_largest": [structure name, ...]}``. The default does
    nothing.
    """

    keep_largest_foreground: bool = False
    keep_largest: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_largest", tuple(str(n) for n in self.keep_largest))

    @property
    def is_identity(self) -> bool:
        return not self.keep_largest_foreground and not self.keep_largest

    def to_json(self) -> dict:
        return {
            "keep_largest_foreground": self.keep_largest_foreground,
            "keep_largest": list(self.keep_largest),
        }

    @classmethod
    def from_json(cls, d: object) -> Postprocessing:
        """Parse :meth:`to_json` output; raises ``ValueError`` on unknown keys or wrong types."""
        if not isinstance(d, dict):
            raise ValueError(f"postprocessing must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"keep_largest_foreground", "keep_largest"})
        if unknown:
            raise ValueError(f"postprocessing has unknown keys {unknown}")
        fg = d.get("keep_largest_foreground", False)
        names = d.get("keep_largest", [])
        if not isinstance(fg, bool):
            raise ValueError(f"postprocessing 'keep_largest_foreground' must be true or false, got {fg!r}")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"postprocessing 'keep_largest' must be a list of structure names, got {names!r}"
            )
        return cls(keep_largest_foreground=fg, keep_largest=tuple(names))


def apply_postprocessing(
    seg: np.ndarray, pp: Postprocessing, structures: Mapping[str, Sequence[int]]
) -> np.ndarray:
    """``seg`` after ``pp``: whole-foreground LCC (if set), then each named structure's LCC in order.

    ``structures`` maps names to label values (e.g. :func:`dataset_structures`). Returns a new array; raises
    ``ValueError`` for a name ``structures`` does not know.
    """
    unknown = [n for n in pp.keep_largest if n not in structures]
    if unknown:
        raise ValueError(f"postprocessing names unknown structure(s) {unknown} (known: {list(structures)})")
    out = keep_largest_foreground(seg) if pp.keep_largest_foreground else np.array(seg, copy=True)
    return keep_largest_component(out, [tuple(structures[n]) for n in pp.keep_largest])


def dataset_structures(spec: DatasetSpec) -> dict[str, tuple[int, ...]]:
    """The structures postprocessing works on: the scored ones, ``{name: values}`` (labels, then regions)."""
    return structures(spec.foreground_labels, spec.regions)


def decide_postprocessing(
    reference_dir: str | os.PathLike,
    prediction_dir: str | os.PathLike,
    spec: DatasetSpec,
    out_dir: str | os.PathLike,
    workers: int = 2,
) -> tuple[Postprocessing, dict]:
    """Choose the postprocessing by the rule in the module docstring and write its result to ``out_dir``.

    ``prediction_dir`` holds ``<case><spec.file_ending>`` label maps scored against the same names in
    ``reference_dir``. ``out_dir`` receives the chosen postprocessing applied to every prediction (atomic
    writes; other label files there are removed) and its ``summary.json``. Trial folders live in a temporary
    folder beside ``out_dir`` and are deleted. Returns ``(postprocessing, report)`` with the report::

        {"tolerance": 1e-4, "connectivity": str,
         "baseline": {"mean_dice": float | None, "dice": {structure: float | None}},
         "steps": [{"step": "foreground" | structure name, "values": [int, ...],
                    "changed_cases": int, "mean_dice": ..., "dice": {...}, "kept": bool, "reason": str}, ...],
         "final": {"mean_dice": ..., "dice": {...}},
         "postprocessing": Postprocessing.to_json()}

    Raises :class:`AutosegError` as :func:`evaluate_folders` does (missing folders, no predictions, ...).
    """
    reference_dir, prediction_dir, out_dir = Path(reference_dir), Path(prediction_dir), Path(out_dir)
    baseline = evaluate_folders(reference_dir, prediction_dir, spec, workers=workers)
    out_dir.mkdir(parents=True, exist_ok=True)
    current, steps, keep_fg, kept_names = _greedy_steps(
        reference_dir, prediction_dir, out_dir, spec, baseline, workers
    )
    write_json(out_dir / WorkDir.SUMMARY, current)
    pp = Postprocessing(keep_largest_foreground=keep_fg, keep_largest=tuple(kept_names))
    report = {
        "tolerance": DICE_TOLERANCE,
        "connectivity": CONNECTIVITY,
        "baseline": _scores(baseline),
        "steps": steps,
        "final": _scores(current),
        "postprocessing": pp.to_json(),
    }
    return pp, report


def _greedy_steps(
    reference_dir: Path,
    prediction_dir: Path,
    out_dir: Path,
    spec: DatasetSpec,
    baseline: dict,
    workers: int,
) -> tuple[dict, list[dict], bool, list[str]]:
    """Try each step in turn (largest foreground component, then each structure's largest component) on the
    predictions as they stand, keep it by :func:`_judge`, and publish the final folder into ``out_dir``.

    Returns (final summary, step reports, keep the largest foreground, structures whose largest component is
    kept)."""
    named = dataset_structures(spec)
    current_dir, current = prediction_dir, baseline
    steps: list[dict] = []
    keep_fg, kept_names = False, []
    with tempfile.TemporaryDirectory(prefix=".postprocessing_trials_", dir=out_dir.parent) as tmp:
        foreground = tuple(sorted({v for values in named.values() for v in values}))
        for i, (name, values) in enumerate([(FOREGROUND, foreground), *named.items()]):
            trial_dir = Path(tmp) / f"step_{i}"
            fn = keep_largest_foreground if name == FOREGROUND else _lcc_of(values)
            changed = _transform_folder(current_dir, trial_dir, spec.file_ending, fn, workers)
            # an unchanged folder scores the same: no evaluation needed, and the step is "all equal"
            trial = evaluate_folders(reference_dir, trial_dir, spec, workers=workers) if changed else current
            kept, reason = _judge(current, trial) if changed else (False, NO_EVIDENCE)
            steps.append({"step": name, "values": list(values), "changed_cases": changed, **_scores(trial)})
            steps[-1].update(kept=kept, reason=reason)
            if kept:
                keep_fg = keep_fg or name == FOREGROUND
                kept_names += [] if name == FOREGROUND else [name]
            if kept and changed:
                if current_dir != prediction_dir:
                    shutil.rmtree(current_dir)  # trials hold a copy of every prediction: keep at most two
                current_dir, current = trial_dir, trial
            else:
                shutil.rmtree(trial_dir)
        _publish(current_dir, out_dir, spec.file_ending)
    return current, steps, keep_fg, kept_names


def structure_dice(summary: Mapping) -> dict[str, float | None]:
    """``{structure: mean Dice}`` from an :func:`evaluate_folders` summary (``None`` where not defined)."""
    return {name: entry["dice"]["mean"] for name, entry in summary["mean"].items()}


def _scores(summary: Mapping) -> dict:
    return {"mean_dice": summary["mean_dice"], "dice": structure_dice(summary)}


NO_EVIDENCE = "changes no voxel of the validation cases: no evidence for it"


def _judge(before: Mapping, after: Mapping) -> tuple[bool, str]:
    """Whether to keep a step, and why: no structure may drop (the step's own structure included)."""
    old, new = structure_dice(before), structure_dice(after)
    drops = [
        f"{name} {old[name]:.4f} -> {new[name]:.4f}"
        for name in old
        if old[name] is not None and new.get(name) is not None and new[name] < old[name] - DICE_TOLERANCE
    ]
    if drops:
        return False, "mean Dice drops: " + ", ".join(drops)
    gains = [
        f"{name} {old[name]:.4f} -> {new[name]:.4f}"
        for name in old
        if old[name] is not None and new.get(name) is not None and new[name] > old[name] + DICE_TOLERANCE
    ]
    if gains:
        return True, "mean Dice improves: " + ", ".join(gains)
    return True, "no mean Dice changes by more than the tolerance"


def _lcc_of(values: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda seg: keep_largest_component(seg, [tuple(values)])


def _label_files(folder: Path, ending: str) -> list[Path]:
    return sorted(
        f for f in folder.iterdir() if f.is_file() and f.name.endswith(ending) and not f.name.startswith(".")
    )


def _transform_folder(
    src: Path, dst: Path, ending: str, fn: Callable[[np.ndarray], np.ndarray], workers: int
) -> int:
    """Write ``fn(label map)`` of every label file of ``src`` to ``dst`` (same geometry, same name); returns
    how many cases changed. Unchanged cases are copied byte for byte."""
    dst.mkdir(parents=True, exist_ok=True)

    def one(path: Path) -> bool:
        volume = read_volume(path, dtype=None)
        out = fn(volume.array)
        if np.array_equal(out, volume.array):
            copy_volume(path, dst / path.name)
            return False
        # the file's own geometry: read_volume without orientation leaves array and geometry as stored
        write_volume(out, volume.geometry, dst / path.name)
        return True

    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        return sum(pool.map(one, _label_files(src, ending)))


def _publish(src: Path, out_dir: Path, ending: str) -> None:
    """Put the label files of ``src`` into ``out_dir`` atomically, removing label files ``src`` lacks."""
    files = _label_files(src, ending)
    names = {f.name for f in files}
    for stale in _label_files(out_dir, ending):
        if stale.name not in names:
            stale.unlink()
    for f in files:
        copy_volume(f, out_dir / f.name)  # an .mhd/.nhdr header after its data file
