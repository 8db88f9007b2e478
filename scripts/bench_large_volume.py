#!/usr/bin/env python
"""Memory and time of planning, prediction and evaluation on a large CT-like volume (512×512×300, 10 labels).

Standalone: it imports autoseg only to plan and to save a checkpoint; prediction and evaluation run as
``python -m autoseg ...`` subprocesses so that their memory is measured alone.

Steps:

1. **synthesize** ``--cases`` CT-like cases of ``--shape`` (array order z y x, default 300 512 512; spacing
   1.5 × 0.8 × 0.8 mm) in the nnU-Net raw layout under ``SCRATCH/raw``: air -1000 HU, an elliptic-cylinder
   body of soft tissue (~0 HU) with a fat rim, two unlabelled lungs, and ``--labels`` ellipsoid organs with
   distinct HU, Gaussian noise (σ 20 HU) everywhere, stored as int16 like real CT.
2. **plan**: ``autoseg.api.plan(raw, work, workers=1, configurations=("3d_fullres",))`` in a subprocess (CT
   normalisation; only the 3d_fullres data are preprocessed, the other configurations are still planned).
3. **checkpoint**: the 3d_fullres network is narrowed (features ``4 * 2**stage`` capped at 32, as
   ``tests/conftest.py::shrink_network``; patch, batch, strides and kernels as planned) and saved *randomly
   initialised* as fold 0's ``checkpoint_final.pt``. No training: the memory of prediction is dominated by
   the probability accumulator and the export, whose size depends on the volume and the number of classes,
   not on the network's width or weights; a narrow network only keeps the CPU time bearable.
4. **predict** case 0 with ``autoseg predict ... -c 3d_fullres -f 0 --device cpu --no-mirroring``, then again
   with ``--save-probabilities``; the output's size, spacing, origin and direction are checked against the
   input's.
5. **evaluate** twice: the (junk, random-weight) prediction against the reference, and the reference against a
   perturbed copy of itself (each organ shifted by 1-3 voxels, every other organ also eroded by one voxel),
   which gives realistic surface-distance work.

Per subprocess: **wall** seconds; **tree peak RSS**, the largest sum of RSS over the process and its
descendants sampled from ``/proc`` every 0.2 s (a shorter spike can be missed); **max RSS**, the largest
single process's kernel high-water mark ``VmHWM`` seen in those samples (exact up to the last 0.2 s before
exit). A subprocess whose summed RSS passes 18 GB is killed (reported as ``kill``) to protect other jobs.

Example (from the repository root)::

    .venv/bin/python scripts/bench_large_volume.py --scratch /work/blv --json /work/blv/result.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from _proctree import tree_pids  # scripts/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
GB = 1024**3
SPACING_MM = (1.5, 0.8, 0.8)  # array order (z, y, x)
FILE_ENDING = ".nii.gz"

# (name, HU) of up to 10 organs; more labels reuse the list with a suffix and a shifted HU.
ORGANS = (
    ("liver", 60),
    ("spleen", 45),
    ("kidney_left", 160),
    ("kidney_right", 145),
    ("pancreas", 35),
    ("aorta", 220),
    ("stomach", 15),
    ("gallbladder", -10),
    ("bladder", 5),
    ("vertebra", 400),
)


# ---------------------------------------------------------------------------------------- process-tree memory


def _rss_hwm_bytes(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of ``pid`` in bytes: current and peak resident set size (0, 0 if it is gone)."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm


def load_average() -> float:
    with open("/proc/loadavg", encoding="ascii") as fh:
        return float(fh.read().split()[0])


class TreeSampler(threading.Thread):
    """Samples the summed RSS of a process tree, the largest single peak RSS (VmHWM) and the 1-min load
    average every ``interval_s``; kills the tree's process group if the summed RSS passes ``cap_bytes``."""

    def __init__(self, root: int, interval_s: float = 0.2, cap_bytes: int | None = None) -> None:
        super().__init__(daemon=True)
        self.root, self.interval_s, self.cap_bytes = root, interval_s, cap_bytes
        self.peak_rss = 0
        self.peak_hwm = 0
        self.capped = False
        self.loads: list[float] = []
        self._halt = threading.Event()

    def run(self) -> None:
        last_load = 0.0
        while not self._halt.is_set():
            rss = 0
            for pid in tree_pids(self.root):
                r, h = _rss_hwm_bytes(pid)
                rss += r
                self.peak_hwm = max(self.peak_hwm, h)
            self.peak_rss = max(self.peak_rss, rss)
            if self.cap_bytes and rss > self.cap_bytes and not self.capped:
                self.capped = True
                try:
                    os.killpg(self.root, 9)
                except OSError:
                    pass
            now = time.monotonic()
            if now - last_load >= 5.0:
                self.loads.append(load_average())
                last_load = now
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


@dataclass
class Step:
    name: str
    command: str
    returncode: int | None
    wall_s: float
    tree_peak_rss_gb: float
    max_single_rss_gb: float
    load_avg_1min_mean: float | None
    load_avg_1min_max: float | None
    note: str = ""


MEMORY_CAP_GB = 18.0


def measure(name: str, cmd: list[str], log: Path, timeout_s: float | None = None, note: str = "") -> Step:
    """Run ``cmd`` (output to ``log``) and measure it; kill its process group after ``timeout_s`` or when its
    summed RSS passes :data:`MEMORY_CAP_GB` (to protect other jobs on the machine)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = TreeSampler(proc.pid, cap_bytes=int(MEMORY_CAP_GB * GB))
        sampler.start()
        timer = None
        if timeout_s:
            timer = threading.Timer(timeout_s, lambda: os.killpg(proc.pid, 9))
            timer.start()
        _, status, _usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if timer:
            timer.cancel()
        sampler.stop()
    rc = os.waitstatus_to_exitcode(status)
    if rc == -9 and sampler.capped:
        note = (note + "; " if note else "") + f"KILLED: tree RSS passed the {MEMORY_CAP_GB:g} GB cap"
        rc = None
    elif rc == -9 and timeout_s and wall >= timeout_s:
        note = (note + "; " if note else "") + f"killed after the {timeout_s:.0f} s time limit"
        rc = None
    loads = sampler.loads
    step = Step(
        name=name,
        command=" ".join(cmd),
        returncode=rc,
        wall_s=round(wall, 1),
        tree_peak_rss_gb=round(sampler.peak_rss / GB, 2),
        # VmHWM, not wait4's ru_maxrss: a forked child's ru_maxrss includes the parent's RSS before exec
        max_single_rss_gb=round(sampler.peak_hwm / GB, 2),
        load_avg_1min_mean=round(float(np.mean(loads)), 2) if loads else None,
        load_avg_1min_max=round(float(np.max(loads)), 2) if loads else None,
        note=note,
    )
    print(
        f"    rc {rc}, {step.wall_s} s, tree peak {step.tree_peak_rss_gb} GB, max RSS {step.max_single_rss_gb} GB,"
        f" load {step.load_avg_1min_mean}/{step.load_avg_1min_max} (mean/max)",
        flush=True,
    )
    if rc not in (0, None):
        print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
    return step


# ------------------------------------------------------------------------------------------------ synthesis


def _ellipsoid_box(centre_vox, semi_vox, shape):
    """Bounding box (slices) of an axis-aligned ellipsoid, clipped to ``shape``."""
    return tuple(
        slice(max(0, int(math.floor(c - r))), min(n, int(math.ceil(c + r)) + 1))
        for c, r, n in zip(centre_vox, semi_vox, shape)
    )


def _ellipsoid_mask(box, centre_vox, semi_vox):
    """Boolean mask of the ellipsoid within ``box`` (broadcast grids: no full-volume temporaries)."""
    grids = np.ogrid[tuple(box)]
    total = sum(((g.astype(np.float32) - c) / r) ** 2 for g, c, r in zip(grids, centre_vox, semi_vox))
    return total <= 1.0


def organ_table(n_labels: int) -> list[tuple[str, int]]:
    out = []
    for i in range(n_labels):
        name, hu = ORGANS[i % len(ORGANS)]
        rounds = i // len(ORGANS)
        out.append((name if rounds == 0 else f"{name}_{rounds}", hu + 7 * rounds))
    return out


def synthesize_case(shape: tuple[int, int, int], n_labels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 image (HU) and a uint8 label map, both ``shape`` (z, y, x)."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    img = np.full(shape, -1000.0, dtype=np.float32)
    lab = np.zeros(shape, dtype=np.uint8)

    # body: elliptic cylinder (2D mask, broadcast along z) with a ~6 mm fat rim of -100 HU
    yy, xx = np.ogrid[:ny, :nx]
    cy, cx = ny / 2 + rng.uniform(-5, 5), nx / 2 + rng.uniform(-5, 5)
    by, bx = 0.36 * ny, 0.46 * nx
    outer = ((yy - cy) / by) ** 2 + ((xx - cx) / bx) ** 2 <= 1.0
    rim = 6.0 / SPACING_MM[1]
    inner = ((yy - cy) / (by - rim)) ** 2 + ((xx - cx) / (bx - rim)) ** 2 <= 1.0
    for z in range(nz):  # slice by slice: no (Z, Y, X) boolean temporaries
        img[z][outer] = -100.0
        img[z][inner] = 0.0

    # unlabelled lungs in the upper third (z small = cranial here), -850 HU
    for side in (-1, 1):
        centre = (0.18 * nz, cy - 0.05 * ny, cx + side * 0.2 * nx)
        semi = (0.2 * nz, 0.22 * ny, 0.14 * nx)
        box = _ellipsoid_box(centre, semi, shape)
        img[box][_ellipsoid_mask(box, centre, semi)] = -850.0

    # organs: ellipsoids in the lower two thirds, on a 2 × 5 (y, x) grid of slots at staggered depths
    for k, (_, hu) in enumerate(organ_table(n_labels)):
        row, col = (k // 5) % 2, k % 5
        centre = (
            nz * (0.45 + 0.25 * ((k * 7) % 5) / 4) + rng.uniform(-0.03, 0.03) * nz,
            cy + (row - 0.5) * 0.34 * by * 2 + rng.uniform(-0.03, 0.03) * ny,
            cx + (col - 2) * 0.32 * bx + rng.uniform(-0.02, 0.02) * nx,
        )
        semi_mm = (rng.uniform(35, 80), rng.uniform(22, 50), rng.uniform(22, 45))
        semi = tuple(s / sp for s, sp in zip(semi_mm, SPACING_MM))
        box = _ellipsoid_box(centre, semi, shape)
        inside = _ellipsoid_mask(box, centre, semi)
        img[box][inside] = float(hu)
        lab[box][inside] = k + 1

    # noise slab by slab (float32, ~ a few slices at a time)
    for z0 in range(0, nz, 16):
        sl = slice(z0, min(nz, z0 + 16))
        img[sl] += rng.standard_normal(img[sl].shape, dtype=np.float32) * 20.0
    np.clip(img, -1024, 3071, out=img)
    return np.rint(img).astype(np.int16), lab


def perturb_labels(lab: np.ndarray, n_labels: int, seed: int) -> np.ndarray:
    """Each organ shifted by 1-3 voxels per axis (random sign); every other organ also eroded by one voxel."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = np.zeros_like(lab)
    boxes = ndimage.find_objects(lab, max_label=n_labels)
    for value, box in enumerate(boxes, start=1):
        if box is None:
            continue
        shift = [int(rng.integers(1, 4)) * int(rng.choice([-1, 1])) for _ in range(3)]
        # the box grown by the shift, so the shifted mask fits
        grown = tuple(slice(max(0, b.start - 3), min(n, b.stop + 3)) for b, n in zip(box, lab.shape))
        mask = lab[grown] == value
        if value % 2 == 0:
            mask = ndimage.binary_erosion(mask)
        mask = ndimage.shift(mask, shift, order=0, mode="constant", cval=False)
        out[grown][mask] = value
    return out


def write_dataset(raw: Path, n_cases: int, shape, n_labels: int) -> tuple[list[str], Path]:
    """The raw dataset under ``raw``; returns case ids and the folder of perturbed references of case 0."""
    from autoseg.io.volume import Geometry, write_volume

    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    perturbed = raw.parent / "perturbed"
    perturbed.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n_cases):
        case = f"ct_{i:03d}"
        ids.append(case)
        t0 = time.perf_counter()
        img, lab = synthesize_case(tuple(shape), n_labels, seed=1000 + i)
        half = [(n - 1) / 2 * s for n, s in zip(reversed(shape), reversed(SPACING_MM))]
        geom = Geometry(
            shape=tuple(shape),
            spacing_mm=SPACING_MM,
            origin_mm=(-half[0] + 3.5, -half[1] - 11.25, -half[2] + 40.0),
            direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        )
        write_volume(img, geom, raw / "imagesTr" / f"{case}_0000{FILE_ENDING}")
        write_volume(lab, geom, raw / "labelsTr" / f"{case}{FILE_ENDING}")
        if i == 0:
            write_volume(perturb_labels(lab, n_labels, seed=7), geom, perturbed / f"{case}{FILE_ENDING}")
        counts = np.bincount(lab.ravel(), minlength=n_labels + 1)
        print(
            f"    {case}: {time.perf_counter() - t0:.0f} s, foreground {int(counts[1:].sum())} voxels, "
            f"smallest organ {int(counts[1:].min())} voxels",
            flush=True,
        )
        del img, lab
    labels = {"background": 0, **{name: k + 1 for k, (name, _) in enumerate(organ_table(n_labels))}}
    spec = {
        "name": "LargeCTSynthetic",
        "description": f"Synthetic CT-like volumes {shape} (z, y, x), {n_labels} ellipsoid organs",
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": n_cases,
        "file_ending": FILE_ENDING,
    }
    (raw / "dataset.json").write_text(json.dumps(spec, indent=2))
    return ids, perturbed


# ------------------------------------------------------------------------------------------------ checkpoint


def save_random_checkpoint(work: Path, base: int, cap: int) -> dict:
    """Narrow the 3d_fullres network in the plans and save a randomly initialised fold-0 checkpoint."""
    import torch

    from autoseg.checkpoint_io import save_checkpoint
    from autoseg.inference.predictor import topology_key
    from autoseg.layout import WorkDir
    from autoseg.networks import build_network
    from autoseg.planning.plans import Plans

    wd = WorkDir(work)
    plans = Plans.load(wd.plans)
    configs = {}
    for name, c in plans.configurations.items():
        feats = [min(base * 2**i, cap) for i in range(c.network.n_stages)]
        configs[name] = replace(c, network=replace(c.network, features_per_stage=feats))
    plans = replace(plans, configurations=configs)
    plans.save(wd.plans)
    cfg = plans.configuration("3d_fullres")
    torch.manual_seed(0)
    net = build_network(cfg.network, plans.input_channels("3d_fullres"), plans.num_outputs)
    fold = wd.fold_dir("3d_fullres", 0)
    fold.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        fold / WorkDir.CHECKPOINT_FINAL,
        {
            "network": net.state_dict(),
            "config": "3d_fullres",
            "topology": json.dumps(topology_key(plans, "3d_fullres")),
            "epoch": 0,
        },
    )
    info = {
        "configurations": sorted(plans.configurations),
        "patch_size": list(cfg.patch_size),
        "batch_size": getattr(cfg, "batch_size", None),
        "spacing": list(cfg.spacing),
        "features_per_stage": list(cfg.network.features_per_stage),
        "n_parameters": int(sum(p.numel() for p in net.parameters())),
        "num_outputs": int(plans.num_outputs),
    }
    return info


def tile_count(shape, patch, step: float = 0.5) -> int:
    from autoseg.inference.sliding_window import tile_starts

    return math.prod(len(tile_starts(max(s, p), p, step)) for s, p in zip(shape, patch))


def cpu_tile_batch() -> int:
    """Tiles per forward pass that ``autoseg predict --device cpu`` uses (setting 0 means automatic: 1 on CPU)."""
    from autoseg.settings import InferenceSettings

    return InferenceSettings().tiles_per_pass("cpu")


def time_one_tile(work: Path, n: int = 3) -> float:
    """Seconds per forward pass of one tile batch of the narrowed network on this CPU (median of ``n``)."""
    import torch

    from autoseg.layout import WorkDir
    from autoseg.networks import build_network
    from autoseg.planning.plans import Plans

    plans = Plans.load(WorkDir(work).plans)
    cfg = plans.configuration("3d_fullres")
    net = build_network(cfg.network, plans.input_channels("3d_fullres"), plans.num_outputs).eval()
    x = torch.randn(cpu_tile_batch(), plans.input_channels("3d_fullres"), *cfg.patch_size)
    times = []
    with torch.inference_mode():
        for _ in range(n):
            t0 = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ---------------------------------------------------------------------------------------------------- checks


def check_geometry(image: Path, pred: Path) -> dict:
    import SimpleITK as sitk

    def info(p: Path) -> sitk.ImageFileReader:
        r = sitk.ImageFileReader()
        r.SetFileName(str(p))
        r.ReadImageInformation()
        return r

    a, b = info(image), info(pred)
    same = {
        "size": a.GetSize() == b.GetSize(),
        "spacing": bool(np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5)),
        "origin": bool(np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)),
        "direction": bool(np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)),
    }
    return {"ok": all(same.values()), **same, "size_xyz": list(b.GetSize())}


def label_histogram(path: Path, n_labels: int) -> list[int]:
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))
    return [int(v) for v in np.bincount(arr.ravel(), minlength=n_labels + 1)]


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=2, help="Cases to synthesize (planning needs >= 2)")
    ap.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"))
    ap.add_argument("--labels", type=int, default=10, help="Foreground labels (organs)")
    ap.add_argument("--scratch", type=Path, default=None, help="Scratch folder (default: a new temp folder)")
    ap.add_argument("--keep", action="store_true", help="Keep the scratch folder")
    ap.add_argument("--json", type=Path, default=None, help="Write the figures here")
    ap.add_argument("--features-base", type=int, default=4, help="Narrowed network: features of stage 0")
    ap.add_argument("--features-cap", type=int, default=32, help="Narrowed network: most features per stage")
    ap.add_argument("--no-probabilities", action="store_true", help="Skip the --save-probabilities run")
    ap.add_argument("--timeout", type=float, default=1800, help="Time limit per subprocess, s")
    ap.add_argument(
        "--eval-junk-timeout", type=float, default=600, help="Limit for evaluating the junk prediction"
    )
    args = ap.parse_args(argv)
    if args.cases < 2:
        ap.error("--cases must be at least 2 (planning needs two cases)")

    python = sys.executable
    created = args.scratch is None
    scratch = Path(tempfile.mkdtemp(prefix="blv_")) if created else args.scratch
    if scratch.exists() and any(scratch.iterdir()):
        ap.error(f"{scratch}: scratch folder is not empty")
    scratch.mkdir(parents=True, exist_ok=True)
    raw, work, logs = scratch / "raw" / "Dataset950_LargeCT", scratch / "work", scratch / "logs"
    logs.mkdir()
    shape = tuple(args.shape)
    result: dict = {
        "shape_zyx": list(shape),
        "spacing_mm_zyx": list(SPACING_MM),
        "labels": args.labels,
        "cases": args.cases,
        "cpu_count": os.cpu_count(),
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1),
        "load_avg_1min_start": load_average(),
        "weights": (
            f"UNTRAINED, randomly initialised and NARROWED (features {args.features_base}*2^stage capped at "
            f"{args.features_cap}; patch, batch, "
            "strides as planned). Memory of prediction is dominated by the probability accumulator and the "
            "export, which scale with voxels x classes, not with network width; the narrow network keeps "
            "CPU time bearable. The prediction is junk; Dice etc. of it mean nothing."
        ),
    }
    steps: list[Step] = []
    try:
        t0 = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] synthesize {args.cases} cases of {shape} in {raw}", flush=True)
        ids, perturbed = write_dataset(raw, args.cases, shape, args.labels)
        result["synthesize_s"] = round(time.perf_counter() - t0, 1)

        plan_code = (
            "import sys; from autoseg import api; "
            "api.plan(sys.argv[1], sys.argv[2], workers=1, configurations=('3d_fullres',))"
        )
        steps.append(
            measure(
                "plan (3d_fullres)",
                [python, "-c", plan_code, str(raw), str(work)],
                logs / "plan.log",
                args.timeout,
                "api.plan(workers=1, configurations=('3d_fullres',)): fingerprint + plans + preprocess",
            )
        )
        if steps[-1].returncode != 0:
            raise SystemExit("planning failed")
        info = save_random_checkpoint(work, args.features_base, args.features_cap)
        tiles = tile_count(shape, info["patch_size"])
        sec = time_one_tile(work)

        tb = cpu_tile_batch()
        info.update(
            tiles=tiles,
            tile_batch=tb,
            seconds_per_tile_batch=round(sec, 2),
            estimated_network_s=round(sec * math.ceil(tiles / tb), 0),
        )
        result["network"] = info
        print(f"    plans: {json.dumps(info)}", flush=True)

        inp = scratch / "input"
        inp.mkdir()
        image = raw / "imagesTr" / f"{ids[0]}_0000{FILE_ENDING}"
        os.symlink(image, inp / image.name)
        ref_dir = scratch / "reference"
        ref_dir.mkdir()
        os.symlink(raw / "labelsTr" / f"{ids[0]}{FILE_ENDING}", ref_dir / f"{ids[0]}{FILE_ENDING}")
        base = [python, "-m", "autoseg", "predict", str(work), str(inp)]
        opts = ["-c", "3d_fullres", "-f", "0", "--device", "cpu", "--no-mirroring"]
        out1 = scratch / "pred"
        steps.append(
            measure(
                "predict",
                [*base, str(out1), *opts],
                logs / "predict.log",
                args.timeout,
                "untrained narrow net",
            )
        )
        pred_file = out1 / f"{ids[0]}{FILE_ENDING}"
        if steps[-1].returncode == 0:
            result["predict_geometry"] = check_geometry(image, pred_file)
            result["predict_label_histogram"] = label_histogram(pred_file, args.labels)
            print(f"    geometry {result['predict_geometry']}", flush=True)
        ev = [python, "-m", "autoseg", "evaluate"]
        djs = ["--dataset-json", str(raw / "dataset.json"), "--workers", "1"]
        steps.append(
            measure(
                "evaluate reference vs perturbed reference",
                [*ev, str(ref_dir), str(perturbed), *djs, "-o", str(scratch / "eval_perturbed.json")],
                logs / "evaluate_perturbed.log",
                args.timeout,
                "each organ shifted 1-3 voxels, half eroded: realistic surfaces",
            )
        )
        summary = scratch / "eval_perturbed.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            result["perturbed_mean_dice"] = s.get("mean_dice")
            result["perturbed_hd95_mean"] = {
                k: v["hd95"]["mean"] for k, v in s["mean"].items() if isinstance(v, dict) and "hd95" in v
            }
        if pred_file.is_file():
            steps.append(
                measure(
                    "evaluate reference vs junk prediction",
                    [*ev, str(ref_dir), str(out1), *djs, "-o", str(scratch / "eval_junk.json")],
                    logs / "evaluate_junk.log",
                    args.eval_junk_timeout,
                    "random-weight prediction: fragmented masks, worst case for surfaces",
                )
            )
        if not args.no_probabilities:
            out2 = scratch / "pred_probs"
            steps.append(
                measure(
                    "predict --save-probabilities",
                    [*base, str(out2), *opts, "--save-probabilities"],
                    logs / "predict_probs.log",
                    args.timeout,
                    "also writes <case>.npz (float16, K x file shape, savez_compressed)",
                )
            )
            npz = out2 / f"{ids[0]}.npz"
            if npz.is_file():
                result["probabilities_npz_gb"] = round(npz.stat().st_size / GB, 3)
            if (out2 / pred_file.name).is_file():
                result["predict_probs_geometry"] = check_geometry(image, out2 / pred_file.name)

    finally:
        result["steps"] = [asdict(s) for s in steps]
        result["load_avg_1min_end"] = load_average()
        _print_table(result, steps)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))
            print(f"figures written to {args.json}")
        if args.keep or not created:
            print(f"scratch kept in {scratch}" if args.keep or not created else "")
        if not args.keep:
            for sub in ("raw", "work", "input", "reference", "perturbed", "pred", "pred_probs"):
                target = scratch / sub
                if target.is_symlink() or target.is_file():
                    target.unlink()
                else:
                    shutil.rmtree(target, ignore_errors=True)
            if created:
                shutil.rmtree(scratch, ignore_errors=True)
    failed = [s for s in steps if s.returncode != 0]
    return 1 if failed else 0


def _print_table(result: dict, steps: list[Step]) -> None:
    z, y, x = result["shape_zyx"]
    print()
    print(
        f"Volume {x}x{y}x{z} (x*y*z), {result['labels']} labels, {result['cases']} cases, "
        f"{result['cpu_count']} CPUs, {result['mem_total_gb']} GB RAM"
    )
    print(f"Weights: {result['weights']}")
    if "network" in result:
        n = result["network"]
        print(
            f"3d_fullres: patch {n['patch_size']}, features {n['features_per_stage']}, {n['tiles']} tiles, "
            f"{n['seconds_per_tile_batch']} s per batch of {n['tile_batch']} (est. network {n['estimated_network_s']:.0f} s)"
        )
    header = (
        f"{'step':<45} {'rc':>4} {'wall s':>8} {'tree peak GB':>13} {'max RSS GB':>11} {'load1 mean/max':>15}"
    )
    print(header)
    print("-" * len(header))
    for s in steps:
        load = f"{s.load_avg_1min_mean}/{s.load_avg_1min_max}" if s.load_avg_1min_mean is not None else "-"
        rc = "kill" if s.returncode is None else str(s.returncode)
        print(
            f"{s.name:<45} {rc:>4} {s.wall_s:>8.1f} {s.tree_peak_rss_gb:>13.2f} {s.max_single_rss_gb:>11.2f} {load:>15}"
        )
    for key in ("predict_geometry", "predict_probs_geometry", "probabilities_npz_gb", "perturbed_mean_dice"):
        if key in result:
            print(f"{key}: {result[key]}")
    print(
        f"load average (1 min) at start {result['load_avg_1min_start']}, at end {result['load_avg_1min_end']}"
    )


if __name__ == "__main__":
    sys.exit(main())
