#!/usr/bin/env python
"""Training speed of autoseg and nnU-Net v2 on the same plan: iterations/s, data-loader wait, peak memory.

Standalone: never imported by autoseg, and nnU-Net is never imported here. nnU-Net runs with the interpreter of
its own virtual environment (``--nnunet-python``) as a separate process; if that interpreter is absent, autoseg
is measured alone and the script says so.

**The same plan.** nnU-Net's ``3d_fullres`` configuration of the dataset (``nnUNetPlans.json``: patch size,
batch size, and the ``PlainConvUNet`` arguments ``n_stages``, ``features_per_stage``, ``kernel_sizes``,
``strides``, ``n_conv_per_stage``) is written into autoseg's plans as an extra configuration
``3d_fullres_nnunet`` (data, normalization and spacing stay autoseg's own ``3d_fullres``). Both networks then
have the same layers; their parameter counts are printed side by side. By default the lists are copied verbatim,
so both frameworks push tensors of exactly the same shape through the network; autoseg and nnU-Net may order the
array axes differently (autoseg reorients every image to LPS before its transpose, nnU-Net does not reorient),
so the patch can cover other anatomy in each: ``--match-axes`` permutes nnU-Net's lists into autoseg's axis order
instead (matched on the median image shape). The computation is the same either way; only the data differ.

**What is timed.** Per framework, in its own process: ``--warmup`` iterations, then ``--iters`` timed ones.

* autoseg: ``train_fold`` (fold ``all``, so there is no end-of-training validation, and ``val_iters=0``) is run
  twice in the same process: one epoch of ``--warmup`` iterations, then (``resume``) one epoch of ``--iters``
  iterations. The figures are that epoch's :class:`EpochReport`: ``train_seconds`` (the iterations alone,
  not checkpointing) and ``data_wait_seconds`` (time blocked on the batch queue). autoseg starts its loader
  thread afresh every epoch, so the timed epoch includes filling the empty queue once; **steady it/s** leaves
  the first timed iteration out (timestamps from ``on_iteration``) and so removes that start-up cost, which a
  real run pays once per 250 iterations.
* nnU-Net: a small driver builds ``nnUNetTrainer(plans, '3d_fullres', 'all', dataset_json, device)``, calls
  ``on_train_start()`` (which starts the augmentation processes and waits for a first batch) and
  ``on_train_epoch_start()``, then loops, timing ``next(trainer.dataloader_train)`` (data wait) and
  ``trainer.train_step(batch)`` (which ends with ``loss.cpu()``, a device sync). The timed window is from the
  start of the first timed ``next()`` to the end of the last ``train_step``; steady it/s again drops the first
  timed iteration.

it/s = ``--iters`` / timed seconds; data wait % = wait / timed seconds. Peak memory: the largest sum of RSS (and
PSS, which does not count shared pages twice) over the process and its descendants, sampled every 0.2 s from
``/proc``, and the largest single process (``wait4`` rusage). Both frameworks get ``--threads`` torch threads
(``torch.set_num_threads``; default: all cores) and ``--loader-workers`` background loader workers: nnU-Net's
``nnUNet_n_proc_DA`` (processes; 0 = in the main process) and autoseg's ``TrainSettings.loader_workers``
(spawned processes; 0 = one background thread). On CUDA, nnU-Net keeps its defaults (cudnn.benchmark,
``torch.compile`` unless ``--nnunet-compile off``, fp16 autocast + GradScaler) and autoseg its own (bf16 autocast
where supported, ``torch.compile``); use more warm-up iterations there (``torch.compile`` compiles during the
first iterations).

Examples (from the repository root)::

    .venv/bin/python scripts/bench_train.py --iters 10 --warmup 2                    # Dataset003, CPU
    .venv/bin/python scripts/bench_train.py --dataset Dataset001_BraTS2015DeepMedic --device cuda \\
        --iters 100 --warmup 20 --loader-workers 12 --json bench_train.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from itertools import permutations
from pathlib import Path

from _proctree import tree_pids  # scripts/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
GB = 1024**3
CONFIG = "3d_fullres"  # nnU-Net's configuration that is compared
AUTOSEG_CONFIG = "3d_fullres_nnunet"  # the configuration this script adds to autoseg's plans
DEFAULT_NNUNET_PYTHON = Path("/work/nnunet_cmp/venv/bin/python")
# places where an nnU-Net preprocessed dataset may already be (checked in this order after --nnunet-preprocessed
# and $nnUNet_preprocessed); otherwise the script preprocesses into its scratch folder
NNUNET_PREPROCESSED_GUESSES = (
    Path("/work/nnunet_cmp/preprocessed_full"),
    Path("/work/nnunet_cmp/preprocessed"),
)


# ---------------------------------------------------------------------------------------- process-tree memory


def _proc_kb(path: str, field: str) -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class TreeSampler(threading.Thread):
    """Largest summed RSS and PSS of a process tree, sampled every ``interval_s`` until :meth:`stop`."""

    def __init__(self, root: int, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.interval_s = root, interval_s
        self.peak_rss = 0
        self.peak_pss: int | None = None  # None: smaps_rollup not readable here
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            rss = pss = 0
            pss_ok = False
            for pid in tree_pids(self.root):
                r = _proc_kb(f"/proc/{pid}/status", "VmRSS:")
                p = _proc_kb(f"/proc/{pid}/smaps_rollup", "Pss:")
                rss += (r or 0) * 1024
                if p is not None:
                    pss, pss_ok = pss + p * 1024, True
            self.peak_rss = max(self.peak_rss, rss)
            if pss_ok:
                self.peak_pss = max(self.peak_pss or 0, pss)
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def measure(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float | None) -> dict:
    """Run ``cmd`` (output to ``log``); its exit code, wall time and peak memory of its process tree."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        timer = None
        if timeout_s:
            timer = threading.Timer(timeout_s, lambda: os.killpg(proc.pid, 9))
            timer.start()
        # wait4 rather than proc.wait(): its rusage covers this command and the descendants it waited for
        _, status, usage = os.wait4(proc.pid, 0)
        if timer:
            timer.cancel()
        try:  # stragglers of this command's own session (e.g. loader processes of a crashed run)
            os.killpg(proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
    return {
        "returncode": proc.returncode,
        "process_wall_s": wall,
        "tree_peak_rss_bytes": sampler.peak_rss,
        "tree_peak_pss_bytes": sampler.peak_pss,
        "max_single_rss_bytes": usage.ru_maxrss * 1024,  # kB on Linux
        "loadavg_1min_at_end": os.getloadavg()[0],  # other work on the machine skews the figures
    }


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- nnU-Net side

# Run with nnU-Net's interpreter: ``python nnunet_driver.py SPEC.json``. Writes the figures to spec["out"].
NNUNET_DRIVER = r"""
import json, os, sys, time
spec = json.load(open(sys.argv[1]))
import torch
torch.set_num_threads(spec["threads"])
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

base = join(os.environ["nnUNet_preprocessed"], spec["dataset"])
plans = load_json(join(base, "nnUNetPlans.json"))
plans["continue_training"] = False  # what nnUNetv2_train's get_trainer_from_args adds
dataset_json = load_json(join(base, "dataset.json"))
device = torch.device(spec["device"])
if device.type == "cuda":  # as nnUNetv2_train does
    torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.benchmark = True
trainer = nnUNetTrainer(plans=plans, configuration=spec["config"], fold="all", dataset_json=dataset_json,
                        device=device)
t_setup = time.perf_counter()
trainer.on_train_start()  # initialize(): network, loss, optimizer; data loaders (first batch fetched)
setup_s = time.perf_counter() - t_setup
trainer.on_train_epoch_start()
net = trainer.network
compiled = type(net).__name__ == "OptimizedModule"
n_params = sum(p.numel() for p in net.parameters())
w, n = spec["warmup"], spec["iters"]
starts, got, ends = [], [], []
for i in range(w + n):
    t0 = time.perf_counter()
    batch = next(trainer.dataloader_train)
    t1 = time.perf_counter()
    trainer.train_step(batch)  # ends with loss.detach().cpu(): the device is synchronised
    t2 = time.perf_counter()
    starts.append(t0); got.append(t1); ends.append(t2)
timed = ends[-1] - starts[w]
wait = sum(got[i] - starts[i] for i in range(w, w + n))
steady = (n - 1) / (ends[-1] - ends[w]) if n > 1 else None
batch_shape = list(batch["data"].shape)
out = {
    "framework": "nnU-Net v2",
    "iters": n, "warmup": w, "timed_s": timed, "data_wait_s": wait, "it_s": n / timed,
    "steady_it_s": steady, "setup_s": setup_s,
    "iteration_s": [ends[i] - starts[i] for i in range(w, w + n)],
    "params": n_params, "batch_shape": batch_shape,
    "device": str(trainer.device), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
    "gpu": torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else None,
    "amp": "fp16 autocast + GradScaler" if trainer.device.type == "cuda" else "off (fp32)",
    "compiled": compiled,
    "loader": f"{type(trainer.dataloader_train).__name__}, nnUNet_n_proc_DA={os.environ.get('nnUNet_n_proc_DA')}",
    "network": type(getattr(net, "_orig_mod", net)).__name__,
}
json.dump(out, open(spec["out"], "w"), indent=1)
# stop the augmentation processes; on_train_end() is not called (it would write a checkpoint)
for loader in (trainer.dataloader_train, trainer.dataloader_val):
    if hasattr(loader, "_finish"):
        loader._finish()
print("bench driver: done", flush=True)
os._exit(0)
"""


def _dataset_id(name: str) -> int:
    m = re.match(r"Dataset(\d{3})_", name)
    if not m:
        raise SystemExit(f"{name}: the dataset folder must be named DatasetNNN_Name for nnU-Net")
    return int(m.group(1))


def _nnunet_ready(base: Path) -> bool:
    """``base`` (a ``nnUNet_preprocessed/DatasetNNN_Name`` folder) has plans and 3d_fullres data."""
    plans = base / "nnUNetPlans.json"
    if not (plans.is_file() and (base / "dataset.json").is_file()):
        return False
    if not (base / "dataset_fingerprint.json").is_file():
        return False
    ident = json.loads(plans.read_text())["configurations"][CONFIG].get("data_identifier", "")
    data = base / ident
    return data.is_dir() and any(data.glob("*.pkl"))


def nnunet_env(python: Path, preprocessed: Path, raw: Path, results: Path) -> dict[str, str]:
    venv = python.parent.parent
    env = {
        **os.environ,
        "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv),
        "nnUNet_raw": str(raw),
        "nnUNet_preprocessed": str(preprocessed),
        "nnUNet_results": str(results),
    }
    for k in ("PYTHONHOME", "PYTHONPATH"):
        env.pop(k, None)
    return env


def _nnunet_roots(args) -> list[Path]:
    roots = [args.nnunet_preprocessed] if args.nnunet_preprocessed else []
    if os.environ.get("nnUNet_preprocessed"):
        roots.append(Path(os.environ["nnUNet_preprocessed"]))
    return roots + list(NNUNET_PREPROCESSED_GUESSES)


def find_or_make_nnunet_preprocessed(args, dataset: Path, scratch: Path) -> Path:
    """An ``nnUNet_preprocessed`` root holding this dataset's 3d_fullres data; preprocesses if none has."""
    for root in _nnunet_roots(args):
        if _nnunet_ready(root / dataset.name):
            return root
    root = scratch / "nnunet_preprocessed"
    if _nnunet_ready(root / dataset.name):
        return root
    raw = scratch / "nnunet_raw"
    raw.mkdir(exist_ok=True)
    if not (raw / dataset.name).exists():
        (raw / dataset.name).symlink_to(dataset.resolve(), target_is_directory=True)
    exe = args.nnunet_python.parent / "nnUNetv2_plan_and_preprocess"
    cmd = [str(exe), "-d", str(_dataset_id(dataset.name)), "-c", CONFIG, "-np", str(args.workers)]
    cmd += ["-npfp", str(args.workers), "--no_pbar"]
    print(
        f"nnU-Net: no preprocessed {CONFIG} data found; running {' '.join(cmd[1:])} into {root}", flush=True
    )
    env = nnunet_env(args.nnunet_python, root, raw, scratch / "nnunet_results")
    log = scratch / "nnunet_preprocess.log"
    with open(log, "wb") as out:
        rc = subprocess.call(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0 or not _nnunet_ready(root / dataset.name):
        raise SystemExit(f"nnU-Net preprocessing failed (exit {rc}); see {log}:\n{_tail(log)}")
    return root


def run_nnunet(args, dataset: Path, preprocessed: Path, scratch: Path) -> dict:
    driver = scratch / "nnunet_driver.py"
    driver.write_text(NNUNET_DRIVER)
    out = scratch / "nnunet_result.json"
    out.unlink(missing_ok=True)
    spec = {
        "dataset": dataset.name,
        "config": CONFIG,
        "device": args.device,
        "threads": args.threads,
        "warmup": args.warmup,
        "iters": args.iters,
        "out": str(out),
    }
    spec_path = scratch / "nnunet_spec.json"
    spec_path.write_text(json.dumps(spec))
    results = scratch / "nnunet_results"
    shutil.rmtree(results, ignore_errors=True)
    env = nnunet_env(args.nnunet_python, preprocessed, scratch / "nnunet_raw", results)
    env["nnUNet_n_proc_DA"] = str(args.loader_workers)
    if args.nnunet_compile != "auto":
        env["nnUNet_compile"] = "true" if args.nnunet_compile == "on" else "false"
    log = scratch / "nnunet_train.log"
    m = measure([str(args.nnunet_python), str(driver), str(spec_path)], env, log, args.timeout)
    if m["returncode"] != 0 or not out.is_file():
        return {
            "framework": "nnU-Net v2",
            "error": f"exit {m['returncode']}; see {log}",
            "log_tail": _tail(log),
        }
    return {**json.loads(out.read_text()), **m, "log": str(log)}


# ---------------------------------------------------------------------------------------------- autoseg side


def _axis_permutation(autoseg_median: list[float], nnunet_median: list[float]) -> tuple[int, ...]:
    """``p`` with autoseg axis ``i`` ~ nnU-Net axis ``p[i]`` (closest median shapes; identity on ties)."""

    def cost(p):
        return sum(abs(math.log(max(a, 1) / max(nnunet_median[j], 1))) for a, j in zip(autoseg_median, p))

    return min(permutations(range(3)), key=lambda p: (round(cost(p), 6), p != (0, 1, 2)))


def nnunet_topology(nn_cfg: dict) -> tuple[dict, list[str]]:
    """autoseg ``NetworkTopology`` fields for nnU-Net's 3d_fullres architecture, and the differences found."""
    arch = nn_cfg["architecture"]
    kw, notes = arch["arch_kwargs"], []
    cls = arch["network_class_name"].rsplit(".", 1)[-1]
    if cls != "PlainConvUNet":
        raise SystemExit(
            f"nnU-Net plans use {cls}; this benchmark maps only PlainConvUNet onto autoseg's 'unet'"
        )
    n_enc, n_dec = set(kw["n_conv_per_stage"]), set(kw["n_conv_per_stage_decoder"])
    if len(n_enc | n_dec) != 1:
        raise SystemExit(
            f"nnU-Net uses n_conv_per_stage={kw['n_conv_per_stage']} / decoder {kw['n_conv_per_stage_decoder']}; "
            "autoseg's NetworkTopology has one n_conv_per_stage for every stage"
        )
    expected = {
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "nonlin": "torch.nn.LeakyReLU",
        "dropout_op": None,
    }
    for key, val in expected.items():
        if kw.get(key) != val:
            notes.append(f"nnU-Net {key}={kw.get(key)!r}, autoseg's U-Net has {val!r}")
    if kw.get("norm_op_kwargs", {}).get("affine") is not True:
        notes.append(f"nnU-Net norm_op_kwargs={kw.get('norm_op_kwargs')}, autoseg uses eps=1e-5, affine=True")
    if kw["n_stages"] != len(kw["strides"]):
        raise SystemExit(
            f"inconsistent nnU-Net plans: n_stages={kw['n_stages']}, {len(kw['strides'])} strides"
        )
    topo = {
        "architecture": "unet",
        "dim": 3,
        "strides": [list(s) for s in kw["strides"]],
        "kernel_sizes": [list(k) for k in kw["kernel_sizes"]],
        "features_per_stage": list(kw["features_per_stage"]),
        "n_conv_per_stage": n_enc.pop(),
        "deep_supervision": True,
    }
    return topo, notes


def prepare_autoseg(args, dataset: Path, nn_plans: dict, work: Path) -> dict:
    """Plan and preprocess with autoseg (unless ``work`` already has it), then add ``AUTOSEG_CONFIG``: autoseg's
    own 3d_fullres data with nnU-Net's patch, batch and network. Returns what was mapped, for the report."""
    from autoseg import api
    from autoseg.layout import WorkDir
    from autoseg.planning.plans import NetworkTopology, Plans

    wd = WorkDir(work)
    plans = Plans.load(wd.plans) if wd.plans.is_file() else None
    source = json.loads(wd.dataset_json.read_text()).get("source") if wd.dataset_json.is_file() else None
    ready = (
        plans is not None
        and source == str(dataset.resolve())
        and CONFIG in plans.configurations
        and any(wd.preprocessed(plans.configurations[CONFIG].data_identifier).glob("*.json"))
    )
    if not ready:
        print(f"autoseg: planning and preprocessing {dataset.name} ({CONFIG}) into {work}", flush=True)
        t = time.perf_counter()
        plans = api.plan(dataset, work, workers=args.workers, configurations=(CONFIG,))
        print(f"autoseg: planned in {time.perf_counter() - t:.1f} s", flush=True)
    own = plans.configuration(CONFIG)
    if nn_plans is None:
        print(f"no nnUNetPlans.json found: autoseg runs its own {CONFIG} plan", flush=True)
        cfg, perm, nn_median, notes = (
            own,
            (0, 1, 2),
            None,
            [f"autoseg's own {CONFIG} plan (no nnU-Net plans)"],
        )
        topo = asdict(own.network)
        patch = list(own.patch_size)
    else:
        nn_cfg = nn_plans["configurations"][CONFIG]
        topo, notes = nnunet_topology(nn_cfg)
        patch = list(nn_cfg["patch_size"])
        nn_median = list(nn_cfg["median_image_size_in_voxels"])
        perm = (0, 1, 2)
        if args.match_axes:
            perm = _axis_permutation(list(own.median_shape), nn_median)
            patch = [patch[j] for j in perm]
            topo["strides"] = [[s[j] for j in perm] for s in topo["strides"]]
            topo["kernel_sizes"] = [[k[j] for j in perm] for k in topo["kernel_sizes"]]
        cfg = replace(
            own,
            name=AUTOSEG_CONFIG,
            patch_size=patch,
            batch_size=int(nn_cfg["batch_size"]),
            network=NetworkTopology(**topo),
            batch_dice=bool(nn_cfg.get("batch_dice", own.batch_dice)),
            estimated_step_seconds={},
        )
    cfg = replace(cfg, name=AUTOSEG_CONFIG)
    plans = replace(plans, configurations={**plans.configurations, AUTOSEG_CONFIG: cfg})
    plans.save(wd.plans)
    if plans.region_based:
        notes.append("autoseg trains region-based (sigmoid) outputs here; nnU-Net trains softmax classes")
    return {
        "autoseg_config": AUTOSEG_CONFIG,
        "from_nnunet_plans": nn_plans is not None,
        "patch_size": patch,
        "batch_size": cfg.batch_size,
        "strides": topo["strides"],
        "kernel_sizes": topo["kernel_sizes"],
        "features_per_stage": topo["features_per_stage"],
        "n_conv_per_stage": topo["n_conv_per_stage"],
        "axis_permutation": list(perm),
        "nnunet_transpose_forward": nn_plans.get("transpose_forward") if nn_plans else None,
        "nnunet_median_shape": nn_median,
        "nnunet_spacing": nn_plans["configurations"][CONFIG].get("spacing") if nn_plans else None,
        "autoseg_orientation": plans.orientation,
        "autoseg_transpose_forward": plans.transpose_forward,
        "autoseg_median_shape": list(own.median_shape),
        "autoseg_spacing": list(own.spacing),
        "autoseg_own_patch_size": list(own.patch_size),
        "autoseg_own_batch_size": own.batch_size,
        "autoseg_own_features": list(own.network.features_per_stage),
        "notes": notes,
    }


def run_autoseg(args, work: Path, scratch: Path) -> dict:
    out = scratch / "autoseg_result.json"
    out.unlink(missing_ok=True)
    spec = {
        "work": str(work),
        "config": AUTOSEG_CONFIG,
        "device": args.device,
        "threads": args.threads,
        "warmup": args.warmup,
        "iters": args.iters,
        "loader_workers": args.loader_workers,
        "out": str(out),
    }
    spec_path = scratch / "autoseg_spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = scratch / "autoseg_train.log"
    cmd = [args.autoseg_python, str(Path(__file__).resolve()), "--worker", str(spec_path)]
    m = measure(cmd, env, log, args.timeout)
    if m["returncode"] != 0 or not out.is_file():
        return {"framework": "autoseg", "error": f"exit {m['returncode']}; see {log}", "log_tail": _tail(log)}
    return {**json.loads(out.read_text()), **m, "log": str(log)}


def autoseg_worker(spec_path: str) -> int:
    """Runs in its own process (``--worker SPEC``): warm-up epoch, then the timed epoch, via ``train_fold``."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from autoseg.layout import WorkDir
    from autoseg.networks import build_network
    from autoseg.planning.plans import Plans
    from autoseg.settings import load_settings
    from autoseg.training.loop import train_fold

    work, config, fold = WorkDir(Path(spec["work"])), spec["config"], "all"
    shutil.rmtree(work.fold_dir(config, fold), ignore_errors=True)
    plans = Plans.load(work.plans)
    cfg = plans.configuration(config)
    net = build_network(cfg.network, plans.input_channels(config), plans.num_outputs)
    n_params = sum(p.numel() for p in net.parameters())
    del net
    device = torch.device(spec["device"])
    extra = {"loader_workers": spec["loader_workers"]}
    w, n = spec["warmup"], spec["iters"]
    stamps: list[float] = []
    reports = []
    t_setup = time.perf_counter()
    if w > 0:
        ts, _ = load_settings(None, epochs=1, iters_per_epoch=w, val_iters=0, **extra)
        train_fold(work, config, fold, ts, device)
    ts, _ = load_settings(None, epochs=2 if w > 0 else 1, iters_per_epoch=n, val_iters=0, **extra)
    train_fold(
        work,
        config,
        fold,
        ts,
        device,
        resume=w > 0,
        on_iteration=lambda it, total, loss: stamps.append(time.perf_counter()),  # loss is a float: synced
        on_epoch=reports.append,
    )
    rep = reports[-1]
    amp = "off (fp32)"
    if device.type == "cuda":
        amp = "bf16 autocast" if torch.cuda.is_bf16_supported() else "fp16 autocast + GradScaler"
    out = {
        "framework": "autoseg",
        "iters": n,
        "warmup": w,
        "timed_s": rep.train_seconds,
        "data_wait_s": rep.data_wait_seconds,
        "it_s": n / rep.train_seconds,
        "steady_it_s": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else None,
        "iteration_s": [b - a for a, b in zip(stamps, stamps[1:])],
        "setup_and_warmup_s": time.perf_counter() - t_setup - rep.seconds,
        "params": n_params,
        "batch_shape": [cfg.batch_size, plans.input_channels(config), *cfg.patch_size],
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "amp": amp,
        "compiled": ts.compile and device.type == "cuda",
        "loader": f"{spec['loader_workers']} spawned worker process(es)"
        if spec["loader_workers"]
        else "one background thread",
        "network": "autoseg UNet",
    }
    Path(spec["out"]).write_text(json.dumps(out, indent=1))
    return 0


# ------------------------------------------------------------------------------------------------------ report


def _gb(b) -> str:
    return "–" if b is None else f"{b / GB:.2f} GB"


def _f(x, fmt=".3f") -> str:
    return "–" if x is None else format(x, fmt)


def report(results: list[dict], mapping: dict, args) -> tuple[str, dict]:
    head = (
        "| framework | it/s | steady it/s | s/it | data wait | peak RSS (tree) | peak PSS (tree) "
        "| max 1-proc RSS | params | device, threads |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    ok = {r["framework"]: r for r in results if "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['framework']} | FAILED ({r['error']}) | | | | | | | | |")
            continue
        wait_pct = 100 * r["data_wait_s"] / r["timed_s"]
        dev = r["device"] + (f" ({r['gpu']})" if r.get("gpu") else "")
        lines.append(
            f"| {r['framework']} | {r['it_s']:.3f} | {_f(r['steady_it_s'])} | {r['timed_s'] / r['iters']:.2f} "
            f"| {wait_pct:.1f} % ({r['data_wait_s']:.2f} s) | {_gb(r['tree_peak_rss_bytes'])} "
            f"| {_gb(r['tree_peak_pss_bytes'])} | {_gb(r['max_single_rss_bytes'])} | {r['params']:,} "
            f"| {dev}, {r['torch_threads']} |"
        )
    ratios = {}
    if len(ok) == 2:
        a, n = ok["autoseg"], ok["nnU-Net v2"]
        ratios = {
            "it_s": a["it_s"] / n["it_s"],
            "steady_it_s": (a["steady_it_s"] / n["steady_it_s"])
            if a["steady_it_s"] and n["steady_it_s"]
            else None,
            "tree_peak_rss": a["tree_peak_rss_bytes"] / n["tree_peak_rss_bytes"],
            "params_equal": a["params"] == n["params"],
        }
        lines.append(
            f"| **autoseg / nnU-Net** | **{ratios['it_s']:.2f}×** | {_f(ratios['steady_it_s'], '.2f')}× | | "
            f"| {ratios['tree_peak_rss']:.2f}× | | | {'equal' if ratios['params_equal'] else 'DIFFER'} | |"
        )
    m = mapping
    text = "\n".join(lines)
    text += (
        f"\n\n{args.dataset}, nnU-Net {CONFIG} plan → autoseg '{m['autoseg_config']}': patch {m['patch_size']}, "
        f"batch {m['batch_size']}, features {m['features_per_stage']}, strides {m['strides']}, "
        f"{m['n_conv_per_stage']} convs/stage"
        f"\n{args.iters} timed iterations after {args.warmup} warm-up; {args.loader_workers} loader worker(s); "
        f"{os.cpu_count()} CPU core(s) here ({platform.processor() or platform.machine()})."
    )
    for r in ok.values():
        text += (
            f"\n{r['framework']}: torch {r['torch']}, {r['network']}, input {r['batch_shape']}, amp {r['amp']}, "
            f"torch.compile {'on' if r['compiled'] else 'off'}; loader {r['loader']}; "
            f"1-min load average at its end {r['loadavg_1min_at_end']:.2f}"
        )
    axes = (
        f"autoseg axes: orientation {m['autoseg_orientation']}, transpose {m['autoseg_transpose_forward']}, "
        f"median shape {m['autoseg_median_shape']}; nnU-Net: transpose {m['nnunet_transpose_forward']}, "
        f"median shape {m['nnunet_median_shape']}; lists permuted by {m['axis_permutation']}"
    )
    text += "\n" + axes + (" (--match-axes)" if args.match_axes else " (copied verbatim: same tensor shapes)")
    for note in m["notes"]:
        text += f"\nnote: {note}"
    return text, ratios


# -------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: the autoseg training process
    ap.add_argument("--dataset", default="Dataset003_SpinalCordTiny", help="folder name under --data-root")
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: both frameworks on GPU 0)")
    ap.add_argument("--iters", type=int, default=20, help="timed training iterations per framework")
    ap.add_argument("--warmup", type=int, default=5, help="untimed iterations before them")
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads, both (default: all cores)"
    )
    ap.add_argument(
        "--loader-workers",
        type=int,
        default=1,
        help="background augmentation workers: nnUNet_n_proc_DA for nnU-Net (0 = in its main process), "
        "TrainSettings.loader_workers for autoseg (default 1)",
    )
    ap.add_argument("--workers", type=int, default=2, help="processes for planning/preprocessing, if needed")
    ap.add_argument("--nnunet-python", type=Path, default=DEFAULT_NNUNET_PYTHON)
    ap.add_argument(
        "--nnunet-preprocessed",
        type=Path,
        default=None,
        help="nnUNet_preprocessed root with the dataset's 3d_fullres data (default: $nnUNet_preprocessed, "
        "then /work/nnunet_cmp/preprocessed_full, /work/nnunet_cmp/preprocessed; else preprocess into --scratch)",
    )
    ap.add_argument(
        "--nnunet-compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="nnUNet_compile; auto = nnU-Net's default (torch.compile on CUDA, off on CPU)",
    )
    ap.add_argument("--skip-nnunet", action="store_true")
    ap.add_argument("--match-axes", action="store_true", help="permute nnU-Net's lists into autoseg's axes")
    default_python = REPO / ".venv" / "bin" / "python"
    ap.add_argument(
        "--autoseg-python", default=str(default_python if default_python.is_file() else sys.executable)
    )
    ap.add_argument(
        "--workdir", type=Path, default=None, help="autoseg WORK folder (kept; reused when already planned)"
    )
    ap.add_argument("--scratch", type=Path, default=None, help="logs and outputs (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per framework before it is killed")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args(argv)
    if args.worker:
        return autoseg_worker(args.worker)
    if args.iters < 1 or args.warmup < 0:
        raise SystemExit("--iters must be >= 1 and --warmup >= 0")
    if args.device.startswith("cuda"):
        args.device = "cuda"  # nnU-Net always trains on cuda:0 (pick the GPU with CUDA_VISIBLE_DEVICES)

    dataset = args.data_root / args.dataset
    if not (dataset / "dataset.json").is_file():
        raise SystemExit(f"{dataset}: dataset.json not found (is ../shared/data there?)")
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bench_train_"))
    scratch.mkdir(parents=True, exist_ok=True)
    work = args.workdir or scratch / f"autoseg_work_{args.dataset}"

    with_nnunet = not args.skip_nnunet and args.nnunet_python.is_file()
    if not args.skip_nnunet and not with_nnunet:
        print(
            f"nnU-Net's interpreter {args.nnunet_python} does not exist: measuring autoseg alone "
            "(pass --nnunet-python PATH to nnU-Net v2's venv python)",
            flush=True,
        )
    if with_nnunet:
        nn_root = find_or_make_nnunet_preprocessed(args, dataset, scratch)
        nn_plans_path = nn_root / args.dataset / "nnUNetPlans.json"
        print(f"nnU-Net: plans and data from {nn_root / args.dataset}", flush=True)
    else:  # autoseg alone: still on nnU-Net's plan if one is on disk, else on autoseg's own 3d_fullres plan
        nn_plans_path = next(
            (
                r / args.dataset / "nnUNetPlans.json"
                for r in _nnunet_roots(args)
                if (r / args.dataset / "nnUNetPlans.json").is_file()
            ),
            None,
        )
    nn_plans = json.loads(nn_plans_path.read_text()) if nn_plans_path else None
    mapping = prepare_autoseg(args, dataset, nn_plans, work)

    results = []
    print(f"autoseg: {args.warmup} + {args.iters} iterations on {args.device} ...", flush=True)
    results.append(run_autoseg(args, work, scratch))
    if with_nnunet:
        print(f"nnU-Net: {args.warmup} + {args.iters} iterations on {args.device} ...", flush=True)
        results.append(run_nnunet(args, dataset, nn_plans_path.parent.parent, scratch))
    for r in results:
        if "error" in r:
            print(f"{r['framework']} FAILED: {r['error']}\n{r.get('log_tail', '')}", flush=True)
    text, ratios = report(results, mapping, args)
    print()
    print(text)
    if not with_nnunet:
        print("nnU-Net v2 was not run, so there is no ratio.")
    print(f"logs in {scratch}")
    if args.json:
        payload = {
            "dataset": args.dataset,
            "configuration": CONFIG,
            "device": args.device,
            "iters": args.iters,
            "warmup": args.warmup,
            "threads": args.threads,
            "loader_workers": args.loader_workers,
            "cpu_count": os.cpu_count(),
            "plan": mapping,
            "results": {r["framework"]: r for r in results},
            "ratio_autoseg_over_nnunet": ratios,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"figures written to {args.json}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
