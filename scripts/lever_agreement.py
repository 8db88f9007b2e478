#!/usr/bin/env python
"""Agreement and speed of issue 20's levers with a TRAINED model on its own validation cases.

Standalone (never imported by autoseg); reads a cross-validated WORK and writes nothing into it. For every
validation case of ``splits.json`` (each with the fold that validated it), on the network's grid against the
preprocessed reference (``<case>_seg.npy``):

* reference: float32, every tile, no mirroring;
* ``bf16``: bfloat16 autocast; ``skip``: tiles with only background skipped (float32); ``onnxruntime`` and
  ``openvino``: the network exported to ONNX and run by that engine (float32, every tile; the export is not
  timed: it is logged); ``--variants`` picks them (default ``fp32,bf16,skip``; the first is the reference);
  each: seconds of the sliding window, fraction of voxels with the reference's label, and per structure the
  Dice against the reference segmentation minus the reference path's Dice;
* with ``--mirroring``: :func:`autoseg.inference.mirroring.choose_mirroring` (every axis subset's mean Dice
  from one pass per flip) and the subset it picks at ``--tolerance``.

Example::

    PYTHONPATH=. .venv/bin/python scripts/lever_agreement.py WORK 2d --mirroring
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from autoseg.inference.mirroring import choose_mirroring, structure_dice
    from autoseg.inference.predictor import Predictor
    from autoseg.jsonio import read_json
    from autoseg.layout import WorkDir
    from autoseg.planning.plans import Plans
    from autoseg.preprocessing.pipeline import load_case_properties
    from autoseg.settings import InferenceSettings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("config")
    ap.add_argument("--mirroring", action="store_true")
    ap.add_argument("--tolerance", type=float, default=0.001)
    ap.add_argument("--cases", type=int, default=0, help="only the first N validation cases (0: all)")
    ap.add_argument("--fold", default=None, help="only the validation cases of this fold")
    ap.add_argument(
        "--variants", default="fp32,bf16,skip", help="comma-separated; the first is the reference"
    )
    args = ap.parse_args()
    log = logging.getLogger("autoseg")  # the engines' export times
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)
    work = WorkDir(args.work)
    plans = Plans.load(work.plans)
    cfg = plans.configuration(args.config)
    data = work.preprocessed(cfg.data_identifier)
    splits = read_json(work.splits)
    case_folds = {c: k for k, s in reversed(list(enumerate(splits))) for c in s["val"]}
    if args.fold is not None:
        case_folds = {c: k for c, k in case_folds.items() if str(k) == args.fold}
    if args.cases:  # one case per fold in turn
        order = sorted(
            case_folds,
            key=lambda c: (sorted(x for x in case_folds if case_folds[x] == case_folds[c]).index(c), c),
        )
        case_folds = {c: case_folds[c] for c in order[: args.cases]}
    structures = [[v] for v in sorted(set(plans.labels.values())) if v > 0]
    if plans.region_based:
        structures = [list(v) for v in plans.regions.values()]
    variants = {
        "fp32": InferenceSettings(
            mirroring=False, compile="off", precision="fp32", skip_background_tiles=False
        ),
        "bf16": InferenceSettings(
            mirroring=False, compile="off", precision="bf16", skip_background_tiles=False
        ),
        "skip": InferenceSettings(
            mirroring=False, compile="off", precision="fp32", skip_background_tiles=True
        ),
    }
    for engine in ("onnxruntime", "openvino"):
        variants[engine] = InferenceSettings(
            mirroring=False, compile="off", precision="fp32", skip_background_tiles=False, backend=engine
        )
    variants = {name: variants[name] for name in args.variants.split(",")}
    print(f"cpu threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.1f}; structures {structures}")
    for case, fold in sorted(case_folds.items()):
        image, seg = np.load(data / f"{case}.npy"), np.load(data / f"{case}_seg.npy")
        background = load_case_properties(data, case).background
        if background is None and all(n.scheme != "ct" for n in plans.normalization):  # preprocessed earlier
            background = [float(image[c].min()) for c in range(image.shape[0])]  # as background_values
        ref_labels = ref_dice = None
        for name, settings in variants.items():
            predictor = Predictor(work, args.config, [fold], torch.device("cpu"), settings, plans=plans)
            start = time.perf_counter()
            probs = predictor.predict_preprocessed(image, background=background)
            seconds = time.perf_counter() - start
            dice = structure_dice(probs, seg, structures, plans.region_based)
            labels = probs.argmax(0) if not plans.region_based else probs > 0.5
            if ref_labels is None:
                ref_labels, ref_dice = labels, dice
            same = (labels == ref_labels).mean()
            delta = [None if a is None or b is None else round(a - b, 5) for a, b in zip(dice, ref_dice)]
            print(
                f"{case} fold {fold} {name}: {seconds:.2f} s, labels equal {same:.4%}, Dice {dice}, d {delta}"
            )
    if args.mirroring:
        found = choose_mirroring(work, plans, args.config, case_folds, args.tolerance, torch.device("cpu"))
        print("mirroring:", found)


if __name__ == "__main__":
    main()
