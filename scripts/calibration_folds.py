"""Temperature fit and ECE per structure on the validation probabilities of the folds trained so far.

``find-best`` fits the temperature only once every fold of a configuration is validated. This script runs the
same fit (:func:`autoseg.evaluation.probabilities.fit_calibration`) on whichever folds exist, one
configuration at a time, so that calibration can be measured on a single fold or a partial cross-validation
(docs/calibration.md). It reads WORK and writes nothing.

    python scripts/calibration_folds.py WORK CONFIG [CONFIG ...] [--folds 0,1]

Prints, per configuration: the folds and cases used, the temperature, the calibration kept (one temperature or
zone temperatures) and on what it was chosen, and ECE on the foreground-relevant voxels before and after each
candidate, per structure, on the fitted cases and (two cases or more) on held-out cases; with ``--json FILE`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from autoseg.errors import AutosegError
from autoseg.evaluation.probabilities import fit_calibration
from autoseg.io.dataset import load_dataset_json
from autoseg.layout import WorkDir
from autoseg.selection import fold_of_cases, load_splits


def fold_items(work: WorkDir, config: str, folds: list[int] | None, ending: str) -> tuple[list, list[int]]:
    """``(case, reference, [probabilities])`` of every case that ``config``'s folds (or ``folds``) validated,
    each from the lowest fold that validates it (as find-best), and the folds used."""
    items, used = [], set()
    for case, k in fold_of_cases(load_splits(work)).items():
        path = work.validation(config, k) / f"{case}.npz"
        if (folds is None or k in folds) and path.is_file():
            items.append((case, work.gt_segmentations / f"{case}{ending}", [path]))
            used.add(k)
    return items, sorted(used)


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("configs", nargs="+")
    parser.add_argument(
        "--folds", help="comma list of folds (default: every fold with validation probabilities)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    work = WorkDir(args.work)
    folds = [int(f) for f in args.folds.split(",")] if args.folds else None
    try:
        spec = load_dataset_json(work.dataset_json)
        results = {}
        for config in args.configs:
            items, used = fold_items(work, config, folds, spec.file_ending)
            if not items:
                print(
                    f"{config}: no validation probabilities (<case>.npz) in any requested fold",
                    file=sys.stderr,
                )
                return 2
            start = time.perf_counter()
            fit = fit_calibration(items, spec)
            fit.update(
                folds=used, cases=[c for c, _, _ in items], seconds=round(time.perf_counter() - start, 1)
            )
            results[config] = fit
            kept = fit["kept"] + (f" {fit['zones']['temperature']}" if "zones" in fit else "")
            print(
                f"{config}: folds {used}, {len(items)} cases, one T = {fit['candidates']['temperature']['parameters']}, kept: {kept}, "
                f"fit {fit['seconds']} s"
            )
            cands = fit["candidates"]
            held = fit["ece_held_out"] is not None
            print(
                f"  {'structure':24s} ECE before -> one T / zones (fitted cases)"
                + (" | held out: before -> one T / zones / kept" if held else "")
            )
            for name, before in fit["ece_before"].items():
                line = (
                    f"  {name:24s} {_f(before)} -> {_f(cands['temperature']['ece_after'][name])} / "
                    f"{_f(cands['zones']['ece_after'][name])}"
                )
                if held:
                    line += (
                        f" | {_f(before)} -> {_f(cands['temperature']['ece_held_out'][name])} / "
                        f"{_f(cands['zones']['ece_held_out'][name])} / {_f(fit['ece_held_out'][name])}"
                    )
                print(line)
    except (AutosegError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
