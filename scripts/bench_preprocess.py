#!/usr/bin/env python
"""Time ``autoseg plan`` against nnU-Net v2's ``nnUNetv2_plan_and_preprocess`` on the same datasets.

Standalone: never imported by autoseg, and nnU-Net is never imported here either. nnU-Net runs from its own
virtual environment (``--nnunet-venv``) as a separate process; if that venv is absent, autoseg is timed alone.

Both tools get the same number of processes (``--workers N``: ``autoseg plan --workers N`` and
``nnUNetv2_plan_and_preprocess -np N -npfp N -c 3d_fullres 2d``), a fresh output folder for every run
(``--workdir`` for autoseg; ``nnUNet_preprocessed`` for nnU-Net), and the dataset files are read once before
the first run so that neither tool pays for a cold page cache.

Per run:

* **wall**: seconds from start to exit of the command.
* **tree peak**: the largest sum of RSS over the process and all its descendants, sampled every 0.1 s (psutil
  if installed, else ``/proc``). Pages shared between processes (forked workers, shared libraries) count once
  per process, and a spike shorter than 0.1 s can be missed.
* **tree PSS**: the same sum with proportional set size (shared pages split between their users) where
  ``/proc/<pid>/smaps_rollup`` is readable; it does not overcount shared pages.
* **max RSS**: the largest single process's peak RSS, from the rusage of the finished command (``os.wait4``:
  the figure ``getrusage(RUSAGE_CHILDREN)`` gives, for this one command alone, so repeats do not mix).

Example (from the repository root; 2 cores)::

    .venv/bin/python scripts/bench_preprocess.py --workers 2 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from _proctree import tree_pids  # scripts/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("Dataset001_BraTS2015DeepMedic", "Dataset002_MSLesionLjubljanaMNI")
GB = 1024**3


@dataclass(frozen=True)
class Run:
    tool: str
    dataset: str
    returncode: int
    wall_s: float
    tree_peak_rss_bytes: int
    tree_peak_pss_bytes: int | None
    max_single_rss_bytes: int
    output_bytes: int


# ---------------------------------------------------------------------------------------- process-tree memory


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _rss_bytes(pid: int) -> int:
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        return _status_kb(pid, "VmRSS:") * 1024


def _pss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


class TreeSampler(threading.Thread):
    """Samples the summed RSS (and PSS) of a process tree every ``interval_s`` until :meth:`stop`."""

    def __init__(self, root: int, interval_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.root, self.interval_s = root, interval_s
        self.peak_rss = 0
        self._peak_pss = 0
        self._pss_read = False  # smaps_rollup may be unreadable here (old kernel, permissions)
        self._halt = threading.Event()

    @property
    def peak_pss(self) -> int | None:
        return self._peak_pss if self._pss_read else None

    def run(self) -> None:
        while not self._halt.is_set():
            rss = pss = 0
            for pid in tree_pids(self.root):
                try:
                    rss += _rss_bytes(pid)
                    pss += _pss_bytes(pid)
                    self._pss_read = True
                except Exception:  # the process ended between listing and reading, or no smaps_rollup
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            self._peak_pss = max(self._peak_pss, pss)
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def measure(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float, int, int | None, int]:
    """Run ``cmd``; return ``(returncode, wall_s, tree_peak_rss, tree_peak_pss, max_single_rss)`` in bytes."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        # wait4 rather than proc.wait(): its rusage covers this command and the descendants it waited for
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
    return proc.returncode, wall, sampler.peak_rss, sampler.peak_pss, usage.ru_maxrss * 1024  # kB on Linux


# -------------------------------------------------------------------------------------------------- the tools


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def warm_page_cache(dataset: Path) -> None:
    for p in sorted(dataset.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def run_autoseg(python: str, dataset: Path, workers: int, scratch: Path) -> Run:
    work = Path(tempfile.mkdtemp(prefix="autoseg_work_", dir=scratch))
    cmd = [python, "-m", "autoseg", "plan", str(dataset), "--workdir", str(work), "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rc, wall, rss, pss, single = measure(cmd, env, scratch / f"autoseg_{dataset.name}.log")
    size = folder_bytes(work)
    shutil.rmtree(work, ignore_errors=True)
    return Run("autoseg", dataset.name, rc, wall, rss, pss, single, size)


def nnunet_raw_for(dataset: Path, raw: Path, scratch: Path) -> Path:
    """``raw`` if it holds the dataset, else a scratch raw folder with a symlink to it."""
    if (raw / dataset.name / "dataset.json").is_file():
        return raw
    tmp_raw = scratch / "nnunet_raw"
    tmp_raw.mkdir(exist_ok=True)
    link = tmp_raw / dataset.name
    if not link.exists():
        link.symlink_to(dataset.resolve(), target_is_directory=True)
    return tmp_raw


def run_nnunet(venv: Path, raw: Path, dataset: Path, workers: int, scratch: Path) -> Run:
    m = re.match(r"Dataset(\d{3})_", dataset.name)
    if not m:
        raise SystemExit(f"{dataset}: name must be DatasetNNN_Name for nnU-Net")
    out = Path(tempfile.mkdtemp(prefix="nnunet_pre_", dir=scratch))
    results = Path(tempfile.mkdtemp(prefix="nnunet_res_", dir=scratch))
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv),
        "nnUNet_raw": str(nnunet_raw_for(dataset, raw, scratch)),
        "nnUNet_preprocessed": str(out),
        "nnUNet_results": str(results),
    }
    env.pop("PYTHONHOME", None)
    n = str(workers)
    cmd = [str(venv / "bin" / "nnUNetv2_plan_and_preprocess"), "-d", str(int(m.group(1)))]
    cmd += ["-np", n, "-npfp", n, "-c", "3d_fullres", "2d", "--no_pbar"]
    rc, wall, rss, pss, single = measure(cmd, env, scratch / f"nnunet_{dataset.name}.log")
    size = folder_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(results, ignore_errors=True)
    return Run("nnU-Net v2", dataset.name, rc, wall, rss, pss, single, size)


# ------------------------------------------------------------------------------------------------------ report


def _gb(b: float | None) -> str:
    return "–" if b is None else f"{b / GB:.2f} GB"


def _median(runs: list[Run], attr: str) -> float | None:
    vals = [getattr(r, attr) for r in runs]
    return None if any(v is None for v in vals) else statistics.median(vals)


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if not a or not b else f"{a / b:.1f}×"


def report(runs: list[Run], workers: int, repeats: int) -> str:
    head = f"| dataset | tool | wall (median of {repeats}) | tree peak RSS | tree peak PSS | max single-process RSS | output |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    ratios = [
        "| dataset | time nnU-Net/autoseg | tree-peak RSS nnU-Net/autoseg | tree-peak PSS | max single RSS |"
    ]
    ratios.append("|---|---|---|---|---|")
    for dataset in dict.fromkeys(r.dataset for r in runs):
        med = {}
        for tool in ("autoseg", "nnU-Net v2"):
            rs = [r for r in runs if r.dataset == dataset and r.tool == tool and r.returncode == 0]
            failed = [r for r in runs if r.dataset == dataset and r.tool == tool and r.returncode != 0]
            if failed:
                lines.append(
                    f"| {dataset} | {tool} | FAILED (exit {failed[0].returncode}, see its log) | | | | |"
                )
            if not rs:
                continue
            med[tool] = {a: _median(rs, a) for a in Run.__dataclass_fields__ if a.endswith(("_s", "_bytes"))}
            walls = ", ".join(f"{r.wall_s:.1f}" for r in rs)
            m = med[tool]
            lines.append(
                f"| {dataset} | {tool} | {m['wall_s']:.1f} s ({walls}) | {_gb(m['tree_peak_rss_bytes'])} | "
                f"{_gb(m['tree_peak_pss_bytes'])} | {_gb(m['max_single_rss_bytes'])} | {m['output_bytes'] / 1e6:.0f} MB |"
            )
        if len(med) == 2:
            a, n = med["autoseg"], med["nnU-Net v2"]
            ratios.append(
                f"| {dataset} | {_ratio(n['wall_s'], a['wall_s'])} | "
                f"{_ratio(n['tree_peak_rss_bytes'], a['tree_peak_rss_bytes'])} | "
                f"{_ratio(n['tree_peak_pss_bytes'], a['tree_peak_pss_bytes'])} | "
                f"{_ratio(n['max_single_rss_bytes'], a['max_single_rss_bytes'])} |"
            )
    out = "\n".join(lines)
    if len(ratios) > 2:
        out += "\n\n" + "\n".join(ratios)
    return out + f"\n\n{workers} process(es) per tool, {os.cpu_count()} CPU core(s) on this machine."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--workers", "-np", type=int, default=2, help="processes for each tool")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--nnunet-venv", type=Path, default=Path("/work/nnunet_cmp/venv"))
    ap.add_argument("--nnunet-raw", type=Path, default=Path("/work/nnunet_cmp/raw"))
    default_python = REPO / ".venv" / "bin" / "python"
    ap.add_argument(
        "--autoseg-python",
        default=str(default_python if default_python.is_file() else sys.executable),
        help="interpreter with autoseg's dependencies (default: the repository's .venv)",
    )
    ap.add_argument(
        "--scratch", type=Path, default=None, help="folder for outputs and logs (default: a temp dir)"
    )
    ap.add_argument("--skip-nnunet", action="store_true")
    args = ap.parse_args(argv)

    nnunet_exe = args.nnunet_venv / "bin" / "nnUNetv2_plan_and_preprocess"
    with_nnunet = not args.skip_nnunet and nnunet_exe.is_file()
    if not args.skip_nnunet and not with_nnunet:
        print(f"nnU-Net venv not found ({nnunet_exe} is absent): timing autoseg alone")
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    scratch.mkdir(parents=True, exist_ok=True)
    datasets = [args.data_root / d for d in args.datasets]
    for d in datasets:
        if not (d / "dataset.json").is_file():
            raise SystemExit(f"{d}: dataset.json not found (is ../shared/data there?)")
        warm_page_cache(d)

    runs: list[Run] = []
    for rep in range(args.repeats):
        for d in datasets:
            tools = [lambda d=d: run_autoseg(args.autoseg_python, d, args.workers, scratch)]
            if with_nnunet:
                tools.append(
                    lambda d=d: run_nnunet(args.nnunet_venv, args.nnunet_raw, d, args.workers, scratch)
                )
            if rep % 2:  # alternate the order so that neither tool always runs right after the other
                tools.reverse()
            for tool in tools:
                r = tool()
                runs.append(r)
                print(
                    f"[{rep + 1}/{args.repeats}] {r.tool:10s} {r.dataset}: exit {r.returncode}, {r.wall_s:.1f} s, "
                    f"tree peak RSS {_gb(r.tree_peak_rss_bytes)}, max single RSS {_gb(r.max_single_rss_bytes)}",
                    flush=True,
                )
    print()
    print(report(runs, args.workers, args.repeats))
    if not with_nnunet:
        print("nnU-Net v2 was not run (no venv), so there are no ratios.")
    print(f"logs in {scratch}")
    return 0 if all(r.returncode == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
