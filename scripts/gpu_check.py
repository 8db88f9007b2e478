#!/usr/bin/env python
"""Everything of issue 20 that needs a GPU, as one command that prints one figures table (run it through
``scripts/gpu_check.sh``). Standalone: never imported by autoseg.

Figures (one row each, ``figure | autoseg | nnU-Net | note``):

* training it/s and peak memory of the ``3d_fullres`` plan of ``--dataset`` (default Dataset001): autoseg
  trains ``--iters`` iterations after ``--warmup`` (fold ``all``, no validation; AMP and compile as its
  defaults on CUDA); nnU-Net through ``scripts/bench_train.py --nnunet-python`` when an interpreter is given,
  else "not run";
* per architecture (unet, resenc, vnet): the planner's memory estimate of that plan against
  ``torch.cuda.max_memory_allocated`` of one training step (forward, loss, backward) at its batch and patch;
* predict seconds per case (``--cases`` cases, autoseg's defaults; nnU-Net via ``scripts/bench_predict.py``
  when an interpreter is given);
* ``pytest -m cuda``: how many CUDA-path tests passed, failed, were skipped.

``--dry-run`` does all of it on the CPU with tiny sizes (a phantom dataset, narrow networks, 2 iterations), so
the script is exercised by the test suite (tests/test_gpu_check.py) and does not rot: the figures then mean
nothing. Budget on one GPU: under 8 minutes.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS: list[tuple[str, str, str, str]] = []


def _row(figure: str, autoseg: str, nnunet: str = "not run", note: str = "") -> None:
    ROWS.append((figure, autoseg, nnunet, note))


def _peak_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB: process peak RSS


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _dataset(args, scratch: Path) -> Path:
    if args.dry_run:
        from autoseg.phantom import make_phantom_dataset

        return make_phantom_dataset(scratch / "Dataset900_Phantom", n_cases=4, seed=0)
    return args.data_root / args.dataset


def _plan(dataset: Path, work: Path, architecture: str, dry_run: bool):
    from autoseg import api
    from autoseg.layout import WorkDir

    plans = api.plan(dataset, work, workers=2, architecture=architecture, configurations=("3d_fullres",))
    if dry_run:  # narrow networks: seconds on a CPU
        sys.path.insert(0, str(REPO))
        from tests.conftest import shrink_network

        plans = shrink_network(WorkDir(work))
    return plans


def _training(work: Path, device, args) -> None:
    """One run of ``--warmup`` + ``--iters`` iterations (compile and loader start fall in the warm-up); it/s
    and peak memory over the timed iterations only (timestamps from ``on_iteration``)."""
    from autoseg import api

    stamps: dict[int, float] = {}

    def tick(done: int, total: int, loss: float) -> None:
        stamps[done] = time.perf_counter()
        if done == args.warmup:
            _reset_peak(device)

    api.train(
        work,
        "3d_fullres",
        "all",
        device=device.type,
        epochs=1,
        iters_per_epoch=args.warmup + args.iters,
        val_iters=0,
        loader_workers=0 if args.dry_run else -1,
        overwrite=True,
        on_iteration=tick,
    )
    seconds = stamps[args.warmup + args.iters] - stamps[args.warmup]
    _row(
        "training it/s (3d_fullres)",
        f"{args.iters / seconds:.2f}",
        note=f"after {args.warmup} warm-up iterations",
    )
    _row("training peak memory GB", f"{_peak_gb(device):.2f}", note="cuda: max_memory_allocated; cpu: RSS")


def _estimate_vs_measured(dataset: Path, scratch: Path, device, args) -> None:
    import torch

    from autoseg.networks import ARCHITECTURES, build_network

    for arch in ARCHITECTURES:
        plans = _plan(dataset, scratch / f"work_{arch}", arch, args.dry_run)
        cfg = plans.configuration("3d_fullres")
        net = build_network(cfg.network, plans.input_channels("3d_fullres"), plans.num_outputs).to(device)
        x = torch.randn(cfg.batch_size, plans.input_channels("3d_fullres"), *cfg.patch_size, device=device)
        _reset_peak(device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            out = net(x)
            loss = sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out]))
        loss.backward()
        measured = f"{_peak_gb(device):.2f}" if device.type == "cuda" else "n/a (CPU)"
        _row(f"memory GB {arch}: planner estimate / measured", f"{cfg.estimated_memory_gb:.2f} / {measured}")
        del net, x, out, loss


def _predict(work: Path, dataset: Path, scratch: Path, device, args) -> None:
    from autoseg import api
    from autoseg.settings import InferenceSettings

    images = sorted((dataset / "imagesTr").glob("*_0000.*"))[: args.cases]
    inputs = scratch / "predict_in"
    inputs.mkdir(exist_ok=True)
    for first in images:
        case = first.name.split("_0000")[0]
        for f in (dataset / "imagesTr").glob(f"{case}_*"):
            (inputs / f.name).symlink_to(f.resolve())
    start = time.perf_counter()
    api.predict(
        work, inputs, scratch / "predict_out", settings=InferenceSettings(), folds=["all"], device=device.type
    )
    per_case = (time.perf_counter() - start) / max(1, len(images))
    _row("predict seconds per case", f"{per_case:.1f}", note=f"{len(images)} case(s), autoseg defaults")


def _nnunet(args, scratch: Path) -> None:
    """nnU-Net's rows through the benchmark scripts, when its interpreter is given (GPU runs only)."""
    if args.dry_run or args.nnunet_python is None:
        why = "dry run" if args.dry_run else "no --nnunet-python"
        _row("nnU-Net training / predict", "", "not run", why)
        return
    for script, extra in (("bench_train.py", ["--iters", str(args.iters)]), ("bench_predict.py", [])):
        cmd = [sys.executable, str(REPO / "scripts" / script), "--device", "cuda", "--dataset", args.dataset]
        cmd += ["--nnunet-python", str(args.nnunet_python), "--scratch", str(scratch / script), *extra]
        done = subprocess.run(cmd, capture_output=True, text=True)
        tail = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
        _row(
            f"nnU-Net via {script}", "", "exit 0" if done.returncode == 0 else f"exit {done.returncode}", tail
        )


def _cuda_tests(args) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(REPO / "tests")]
    if args.dry_run:
        cmd.append("--collect-only")  # on a CPU they would only skip: check that they are collected
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    _row("pytest -m cuda", last, note=f"exit {done.returncode}")


def _table() -> str:
    head = ("figure", "autoseg", "nnU-Net", "note")
    widths = [max(len(r[i]) for r in [head, *ROWS]) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in [head, *ROWS]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny phantom sizes: checks the script only")
    ap.add_argument("--dataset", default="Dataset001_BraTS2015DeepMedic")
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument(
        "--nnunet-python", type=Path, default=None, help="nnU-Net v2's interpreter (else not run)"
    )
    ap.add_argument("--iters", type=int, default=None, help="timed training iterations (50; dry run 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations first (10; dry run 1)")
    ap.add_argument("--cases", type=int, default=None, help="cases to predict (4; dry run 1)")
    ap.add_argument("--scratch", type=Path, default=None)
    args = ap.parse_args(argv)
    small = args.dry_run
    args.iters = args.iters or (2 if small else 50)
    args.warmup = args.warmup or (1 if small else 10)
    args.cases = args.cases or (1 if small else 4)
    import torch

    if not small and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run to check the script on a CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if small else "cuda")
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    scratch.mkdir(parents=True, exist_ok=True)
    dataset = _dataset(args, scratch)
    work = scratch / "work"
    _plan(dataset, work, "unet", small)
    _training(work, device, args)
    _estimate_vs_measured(dataset, scratch, device, args)
    _predict(work, dataset, scratch, device, args)
    _nnunet(args, scratch)
    _cuda_tests(args)
    print(
        f"device: {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu (dry run)'}; "
        f"torch {torch.__version__}; load {os.getloadavg()[0]:.1f}"
    )
    print(_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
