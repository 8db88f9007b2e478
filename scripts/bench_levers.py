#!/usr/bin/env python
"""Seconds of the sliding window's forward passes under each CPU lever, and how many tiles skipping saves.

Standalone (never imported by autoseg). One case of a planned WORK (``--work``, e.g. Dataset001's) is read and
preprocessed as ``autoseg predict`` does; the ``--config`` network is built with random weights (``--seed``:
a speed measurement, the labels mean nothing; agreement is tested with trained weights in
tests/inference/test_speed_levers.py). Printed:

* the tile count of the case with and without skipping tiles that hold only background
  (:attr:`CaseProperties.background`), at ``--step``;
* per lever (fp32, bf16 autocast, channels_last_3d with either), the median seconds of ``--passes`` eager
  forward passes of one tile (after one warm-up pass), and against fp32 the largest probability difference
  and the fraction of voxels with the same arg-max (random weights: a check of the arithmetic only);
  ``onnxruntime`` and ``openvino`` levers: the network exported to ONNX (export and load time printed apart)
  and run by that engine in float32 on as many threads as torch.

The 1-minute load average is printed: other work on the machine skews every figure.

Example::

    PYTHONPATH=. .venv/bin/python scripts/bench_levers.py --work WORK --images RAW/imagesTr --passes 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _prepare(work_root: Path, images: Path, config: str, case: str | None):
    from autoseg.io.dataset import discover_inputs
    from autoseg.io.volume import read_channels
    from autoseg.layout import WorkDir
    from autoseg.planning.plans import Plans
    from autoseg.preprocessing.pipeline import preprocess_image

    work = WorkDir(work_root)
    plans = Plans.load(work.plans)
    cfg = plans.configuration(config)
    cases = discover_inputs([images], len(plans.channel_names))
    chosen = next(c for c in cases if case is None or c.case_id == case)
    raw, geom, source = read_channels(chosen.images, plans.orientation, chosen.four_d)
    image, _, props = preprocess_image(raw, geom, source, plans, cfg, None, chosen.case_id)
    return plans, cfg, image, props, chosen.case_id


def _tiles(image, cfg, props, step: float) -> tuple[int, int]:
    from autoseg.inference.sliding_window import _TileGrid

    grid = _TileGrid(image, list(cfg.patch_size), step, 1, props.background)
    return grid.total, grid.skipped


def _time(net, x, dtype, passes: int) -> tuple[float, torch.Tensor]:
    times = []
    with torch.inference_mode():
        for i in range(passes + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                out = net(x)
            out = (out[0] if isinstance(out, (list, tuple)) else out).float()
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times), torch.softmax(out, 1)


def _engine(net, tile, engine: str):
    """``net`` exported to ONNX and loaded in ``engine`` for ``tile``'s shape (the time it took printed)."""
    from autoseg.inference.backends import OnnxRunner

    start = time.perf_counter()
    runner = OnnxRunner(net, tuple(tile.shape), torch.get_num_threads(), engine)
    print(f"{engine}: exported and loaded in {time.perf_counter() - start:.1f} s")
    return runner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--config", default="3d_fullres")
    ap.add_argument("--case", default=None)
    ap.add_argument("--step", type=float, default=0.5)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--levers", default="fp32,bf16,cl3d_fp32,cl3d_bf16", help="also: onnxruntime, openvino")
    args = ap.parse_args()
    from autoseg.inference.runner import cpu_has_native_bf16
    from autoseg.networks import build_network

    plans, cfg, image, props, case = _prepare(args.work, args.images, args.config, args.case)
    total, skipped = _tiles(image, cfg, props, args.step)
    print(f"cpu: {_cpu_name()}; native bf16: {cpu_has_native_bf16()}; threads {torch.get_num_threads()}")
    print(f"case {case}: image {tuple(image.shape)}, patch {cfg.patch_size}, background {props.background}")
    print(f"tiles at step {args.step}: {total}, skipped as background: {skipped} ({skipped / total:.0%})")
    torch.manual_seed(args.seed)
    net = build_network(cfg.network, plans.input_channels(args.config), plans.num_outputs).eval()
    z, y, x = (min(p, s) for p, s in zip(cfg.patch_size, image.shape[1:]))
    tile = torch.zeros((1, image.shape[0], *cfg.patch_size))  # an image smaller than the patch: 0-padded
    tile[0, :, :z, :y, :x] = torch.from_numpy(image[:, :z, :y, :x].copy())
    ref = None
    for lever in args.levers.split(","):
        dtype = torch.bfloat16 if lever.endswith("bf16") else None
        cl = lever.startswith("cl3d")
        fmt = torch.channels_last_3d if cl else torch.contiguous_format
        run = _engine(net, tile, lever) if lever in ("onnxruntime", "openvino") else net.to(memory_format=fmt)
        seconds, probs = _time(run, tile.to(memory_format=fmt), dtype, args.passes)
        ref = probs if ref is None else ref
        same = (probs.argmax(1) == ref.argmax(1)).float().mean().item()
        diff = (probs - ref).abs().max().item()
        print(f"{lever:10s} {seconds:7.2f} s/tile  max|dp| {diff:.4f}  argmax equal {same:.4%}")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
