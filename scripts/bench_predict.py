#!/usr/bin/env python
"""Prediction speed of autoseg and nnU-Net v2 with the same network weights: wall time and peak memory.

Standalone: never imported by autoseg, and nnU-Net is never imported here. nnU-Net runs with the interpreter of
its own virtual environment (``--nnunet-python``) as separate processes; if that interpreter is absent, autoseg
is measured alone and the script says so.

**The same network.** As in ``scripts/bench_train.py`` (whose helpers are reused), nnU-Net's ``3d_fullres``
plan of the dataset (patch size and the ``PlainConvUNet`` arguments) is written into autoseg's plans as an
extra configuration ``3d_fullres_nnunet``; autoseg's own ``3d_fullres`` data handling (reading, reorienting,
normalization, spacing) is kept. **The same weights.** One set of weights is made in autoseg's U-Net: a random
initialisation with a fixed ``--seed`` (no training: this is a speed benchmark, the label maps are meaningless
as segmentations). It is saved as an autoseg checkpoint, then converted to nnU-Net's ``PlainConvUNet``
parameter names by a small driver run with nnU-Net's interpreter: both networks are built, their parameters are
matched in order within four groups (encoder stages ↔ ``encoder.stages``, decoder stages ↔
``decoder.stages``, transposed convolutions ↔ ``decoder.transpconvs``, segmentation heads ↔
``decoder.seg_layers``) after checking that every shape agrees, and both networks are run on the same random
input: the largest absolute difference of their logits is reported. The converted weights are written as an
nnU-Net results folder (``nnUNet_results/DatasetNNN_Name/nnUNetTrainer__nnUNetPlans__3d_fullres/`` with
``dataset.json``, ``plans.json`` and ``fold_0/checkpoint_final.pth`` holding ``network_weights``,
``init_args``, ``trainer_name`` and ``inference_allowed_mirroring_axes``, the keys nnU-Net's predictor reads).

**What is timed.** Per framework, one prediction command run as a subprocess, from its start (interpreter
start-up and imports included) until it exits with every label map written: reading, preprocessing,
sliding-window inference (step ``--step-size``, Gaussian weighting, mirroring over the three axes unless
``--no-mirroring``), resampling back and writing. The first ``--cases`` cases of ``imagesTr`` are symlinked into
one input folder that both read.

* autoseg: ``autoseg predict WORK IN OUT -c 3d_fullres_nnunet -f 0 --step S --device D --compile C`` (one
  process: a reader thread, the main thread running the network, a writer thread; ``--autoseg-compile``,
  default ``auto`` as in autoseg itself: the network is compiled once enough network time is ahead, and the
  compile time is inside the measured wall time).
* nnU-Net: ``nnUNetv2_predict -i IN -o OUT -d N -c 3d_fullres -f 0 -step_size S -device D -npp P -nps P``:
  the main process runs the network, ``-npp`` background processes preprocess, ``-nps`` spawned processes
  export (``--nnunet-npp`` / ``--nnunet-nps``, default 1 each; nnU-Net's own default is 3).

On CPU both are launched through a two-line wrapper that pins ``torch.set_num_threads(--threads)`` (nnU-Net's
entry point would otherwise set it to the core count itself) and both get ``OMP_NUM_THREADS=--threads``. Peak
memory: the largest sum of RSS (and PSS, which does not count shared pages twice) over the command's process
tree, sampled every 0.2 s from ``/proc``, and the largest single process (``wait4`` rusage). The 1-minute load
average is recorded: other work on the machine skews every figure.

On a 2-core machine the two runs must not overlap anything else; ``--skip-nnunet --json A.json`` then
``--earlier A.json`` (same ``--scratch``) times each framework alone at a different moment and still
compares their label maps.

**Agreement.** The two frameworks' label maps are compared per case: Dice per label present in either, and the
fraction of voxels with the same label. With the same weights and the same preprocessing they should be
near-identical; this is reported, not asserted.

Budget: on a CPU, one 96×160×160 tile of the 31M-parameter BraTS network takes seconds to tens of seconds; a case
is 12 tiles, ×8 with mirroring. The script times one tile first and prints the expected duration (``--estimate``
stops there).

Examples (from the repository root)::

    .venv/bin/python scripts/bench_predict.py --cases 1 --no-mirroring          # quick CPU check
    .venv/bin/python scripts/bench_predict.py --device cuda --json bench_predict.json   # 4 cases, mirrored
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import (  # noqa: E402  (sibling script: process-tree sampler, nnU-Net plan → autoseg config)
    AUTOSEG_CONFIG,
    CONFIG,
    DEFAULT_NNUNET_PYTHON,
    NNUNET_PREPROCESSED_GUESSES,
    _dataset_id,
    _tail,
    measure,
    nnunet_env,
    prepare_autoseg,
)

GB = 1024**3
TRAINER_DIR = f"nnUNetTrainer__nnUNetPlans__{CONFIG}"
FOLD = 0

# Run with autoseg's interpreter: ``python -c AUTOSEG_LAUNCH THREADS <autoseg CLI args>``.
AUTOSEG_LAUNCH = (
    "import sys, torch\n"
    "n = int(sys.argv[1])\n"
    "if n > 0: torch.set_num_threads(n)\n"
    "from autoseg.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)
# Run with nnU-Net's interpreter: ``python -c NNUNET_LAUNCH THREADS <nnUNetv2_predict args>``; what the
# ``nnUNetv2_predict`` console script runs, with its torch.set_num_threads(cpu_count) pinned to THREADS.
NNUNET_LAUNCH = (
    "import sys, torch\n"
    "n = int(sys.argv[1])\n"
    "if n > 0:\n"
    "    _set = torch.set_num_threads\n"
    "    _set(n)\n"
    "    torch.set_num_threads = lambda k: _set(n)\n"
    "from nnunetv2.inference.predict_from_raw_data import predict_entry_point\n"
    "sys.argv = ['nnUNetv2_predict'] + sys.argv[2:]\n"
    "sys.exit(predict_entry_point())\n"
)

# Run with nnU-Net's interpreter: ``python convert.py SPEC.json``. Builds nnU-Net's network from its plans,
# copies autoseg's weights into it (in order within each group, shapes checked), compares logits on the same
# random input, and writes the nnU-Net results folder.
NNUNET_CONVERT = r"""
import inspect, json, os, shutil, sys
import torch
spec = json.load(open(sys.argv[1]))
torch.set_num_threads(spec["threads"])
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

plans = load_json(spec["plans"])
dataset_json = load_json(spec["dataset_json"])
pm = PlansManager(plans)
cm = pm.get_configuration(spec["config"])
n_in = determine_num_input_channels(pm, cm, dataset_json)
n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
# exactly what nnUNetPredictor.initialize_from_trained_model_folder builds
if "plans_manager" in inspect.signature(nnUNetTrainer.build_network_architecture).parameters:
    net = nnUNetTrainer.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=False)
else:  # the older signature
    net = nnUNetTrainer.build_network_architecture(
        cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import,
        n_in, n_out, enable_deep_supervision=False)
src = torch.load(spec["autoseg_weights"], map_location="cpu", weights_only=True)
state, order = src["state"], src["order"]
groups = [("encoder.", "encoder.stages."), ("decoder.", "decoder.stages."), ("up.", "decoder.transpconvs."),
          ("heads.", "decoder.seg_layers.")]
nn_params = list(net.named_parameters())  # shared tensors (decoder.encoder, all_modules) listed once
pairs, problems = [], []
for a_pre, n_pre in groups:
    a_names = [k for k in order if k.startswith(a_pre)]
    n_named = [(k, p) for k, p in nn_params if k.startswith(n_pre)]
    if len(a_names) != len(n_named):
        problems.append(f"group {a_pre}*: autoseg has {len(a_names)} tensors, nnU-Net {n_pre}* {len(n_named)}")
        continue
    for a, (n, p) in zip(a_names, n_named):
        if tuple(state[a].shape) != tuple(p.shape):
            problems.append(f"{a} {tuple(state[a].shape)} vs {n} {tuple(p.shape)}")
        pairs.append((a, n, p))
mapped = {n for _, n, _ in pairs}
unmapped_nn = [k for k, _ in nn_params if k not in mapped]
unmapped_as = [k for k in order if not any(k.startswith(g[0]) for g in groups)]
if unmapped_nn or unmapped_as:
    problems.append(f"unmapped: nnU-Net {unmapped_nn[:5]}, autoseg {unmapped_as[:5]}")
result = {"n_tensors_autoseg": len(order), "n_tensors_nnunet": len(nn_params), "n_pairs": len(pairs),
          "params_autoseg": int(sum(state[k].numel() for k in order)),
          "params_nnunet": int(sum(p.numel() for _, p in nn_params)), "problems": problems,
          "examples": [[a, n, list(p.shape)] for a, n, p in pairs[:2] + pairs[-2:]],
          "network": type(net).__name__, "nnunet_buffers": [k for k, _ in net.named_buffers()]}
if not problems:
    with torch.no_grad():
        for a, n, p in pairs:
            p.copy_(state[a])
    net.eval()
    with torch.inference_mode():
        logits = net(src["x"])
    ref = src["logits"]
    result["logits_shape"] = list(logits.shape)
    result["max_abs_diff"] = float((logits - ref).abs().max())
    result["max_abs_logit"] = float(ref.abs().max())
    result["argmax_agreement"] = float((logits.argmax(1) == ref.argmax(1)).float().mean())
    out = os.path.join(spec["results"], spec["dataset"], spec["trainer_dir"])
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, f"fold_{spec['fold']}"))
    shutil.copy(spec["plans"], os.path.join(out, "plans.json"))
    shutil.copy(spec["dataset_json"], os.path.join(out, "dataset.json"))
    ckpt = {
        "network_weights": net.state_dict(),
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": 0,
        "init_args": {"plans": plans, "configuration": spec["config"], "fold": spec["fold"],
                      "dataset_json": dataset_json, "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(ckpt, os.path.join(out, f"fold_{spec['fold']}", "checkpoint_final.pth"))
    result["checkpoint"] = os.path.join(out, f"fold_{spec['fold']}", "checkpoint_final.pth")
json.dump(result, open(spec["out"], "w"), indent=1)
"""


# ------------------------------------------------------------------------------------------------- helpers


def _gb(b) -> str:
    return "–" if b is None else f"{b / GB:.2f} GB"


def _case_ids(dataset: Path, ending: str) -> list[str]:
    ids = sorted({p.name[: -len(ending)][:-5] for p in (dataset / "imagesTr").glob(f"*_0000{ending}")})
    if not ids:
        raise SystemExit(f"{dataset}/imagesTr: no *_0000{ending} images")
    return ids


def make_input(dataset: Path, cases: list[str], n_channels: int, ending: str, folder: Path) -> None:
    """Symlinks to the cases' channel files (never copies of the volumes)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for c in cases:
        for ch in range(n_channels):
            name = f"{c}_{ch:04d}{ending}"
            (folder / name).symlink_to((dataset / "imagesTr" / name).resolve())


def find_nnunet_plans(args, dataset: Path, scratch: Path, with_nnunet: bool) -> Path | None:
    """``nnUNetPlans.json`` of the dataset (its folder also holds nnU-Net's ``dataset.json``); made with
    ``nnUNetv2_plan_and_preprocess --no_pp`` into the scratch folder when none exists and nnU-Net is here."""
    roots = [args.nnunet_preprocessed] if args.nnunet_preprocessed else []
    if os.environ.get("nnUNet_preprocessed"):
        roots.append(Path(os.environ["nnUNet_preprocessed"]))
    roots += [*NNUNET_PREPROCESSED_GUESSES, scratch / "nnunet_preprocessed"]
    for r in roots:
        base = r / dataset.name
        if (base / "nnUNetPlans.json").is_file() and (base / "dataset.json").is_file():
            return base / "nnUNetPlans.json"
    if not with_nnunet:
        return None
    root, raw = scratch / "nnunet_preprocessed", scratch / "nnunet_raw"
    raw.mkdir(parents=True, exist_ok=True)
    if not (raw / dataset.name).exists():
        (raw / dataset.name).symlink_to(dataset.resolve(), target_is_directory=True)
    exe = args.nnunet_python.parent / "nnUNetv2_plan_and_preprocess"
    cmd = [str(exe), "-d", str(_dataset_id(dataset.name)), "-c", CONFIG, "--no_pp", "-npfp", "2"]
    print(f"nnU-Net: no plans found; running {' '.join(cmd[1:])} into {root}", flush=True)
    log = scratch / "nnunet_plan.log"
    with open(log, "wb") as out:
        rc = subprocess.call(
            cmd,
            env=nnunet_env(args.nnunet_python, root, raw, scratch / "nnunet_results"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    plans = root / dataset.name / "nnUNetPlans.json"
    if rc != 0 or not plans.is_file():
        raise SystemExit(f"nnU-Net planning failed (exit {rc}); see {log}:\n{_tail(log)}")
    return plans


# ------------------------------------------------------------------------------------------- shared weights


def make_weights(args, work: Path, scratch: Path) -> dict:
    """Random weights (seeded) in autoseg's network, saved as its fold-0 checkpoint; also the tensors the
    nnU-Net conversion needs (state, parameter order, a random input and autoseg's logits on it)."""
    import torch

    from autoseg.checkpoint_io import save_checkpoint
    from autoseg.inference.predictor import topology_key
    from autoseg.layout import WorkDir
    from autoseg.networks import build_network
    from autoseg.planning.plans import Plans

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    wd = WorkDir(work)
    plans = Plans.load(wd.plans)
    cfg = plans.configuration(AUTOSEG_CONFIG)
    in_ch = plans.input_channels(AUTOSEG_CONFIG)
    torch.manual_seed(args.seed)
    net = build_network(cfg.network, in_ch, plans.num_outputs)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    path = wd.checkpoint(AUTOSEG_CONFIG, FOLD)
    path.parent.mkdir(parents=True, exist_ok=True)
    topo = json.dumps(topology_key(plans, AUTOSEG_CONFIG))
    save_checkpoint(path, {"network": state, "config": AUTOSEG_CONFIG, "topology": topo, "epoch": 0})
    net.eval()
    # equivalence input: the smallest multiple of the total stride per axis, times 2
    total = [1, 1, 1]
    for s in cfg.network.strides:
        total = [t * k for t, k in zip(total, s)]
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(1, in_ch, *[2 * t for t in total], generator=gen)
    with torch.inference_mode():
        logits = net(x)
    order = [k for k, _ in net.named_parameters()]
    weights = scratch / "autoseg_weights.pt"
    torch.save({"state": state, "order": order, "x": x, "logits": logits}, weights)
    info = {
        "checkpoint": str(path),
        "seed": args.seed,
        "params": int(sum(p.numel() for p in net.parameters())),
        "buffers": [k for k, _ in net.named_buffers()],
        "num_outputs": plans.num_outputs,
        "region_based": plans.region_based,
        "in_channels": in_ch,
        "patch_size": list(cfg.patch_size),
        "equivalence_input": list(x.shape),
        "weights_file": str(weights),
    }
    if not args.skip_estimate:  # one full tile, the unit of sliding-window work
        tile = torch.randn(1, in_ch, *cfg.patch_size, generator=gen)
        with torch.inference_mode():
            t = time.perf_counter()
            net(tile)
            info["tile_forward_s"] = time.perf_counter() - t
    return info


def convert_for_nnunet(args, dataset: Path, plans_json: Path, weights: Path, results: Path, scratch: Path):
    spec = {
        "plans": str(plans_json),
        "dataset_json": str(plans_json.parent / "dataset.json"),
        "config": CONFIG,
        "autoseg_weights": str(weights),
        "results": str(results),
        "dataset": dataset.name,
        "trainer_dir": TRAINER_DIR,
        "fold": FOLD,
        "threads": max(args.threads, 1),
        "out": str(scratch / "convert_result.json"),
    }
    (scratch / "convert_spec.json").write_text(json.dumps(spec))
    (scratch / "nnunet_convert.py").write_text(NNUNET_CONVERT)
    log = scratch / "nnunet_convert.log"
    Path(spec["out"]).unlink(missing_ok=True)
    env = nnunet_env(args.nnunet_python, plans_json.parent.parent, scratch / "nnunet_raw", results)
    cmd = [str(args.nnunet_python), str(scratch / "nnunet_convert.py"), str(scratch / "convert_spec.json")]
    with open(log, "wb") as out:
        rc = subprocess.call(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0 or not Path(spec["out"]).is_file():
        raise SystemExit(f"weight conversion failed (exit {rc}); see {log}:\n{_tail(log)}")
    return json.loads(Path(spec["out"]).read_text())


def _tile_count(shape: list[int], patch: list[int], step: float) -> int:
    import math

    n = 1
    for s, p in zip(shape, patch):
        n *= 1 if s <= p else int(math.ceil((s - p) / (p * step))) + 1
    return n


# ----------------------------------------------------------------------------------------------- prediction


def run_autoseg(args, work: Path, inp: Path, out: Path, scratch: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cli = ["predict", str(work), str(inp), str(out), "-c", AUTOSEG_CONFIG, "-f", str(FOLD)]
    cli += ["--step", str(args.step_size), "--device", args.device]
    if args.no_mirroring:
        cli.append("--no-mirroring")
    elif args.autoseg_mirror_axes is not None:
        cli += ["--mirror-axes", args.autoseg_mirror_axes] if args.autoseg_mirror_axes else ["--no-mirroring"]
    cli += ["--compile", args.autoseg_compile]
    threads = args.threads if args.device == "cpu" else 0
    cmd = [args.autoseg_python, "-c", AUTOSEG_LAUNCH, str(threads), *cli]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = scratch / "autoseg_predict.log"
    m = measure(cmd, env, log, args.timeout)
    return {
        "framework": "autoseg",
        "command": "autoseg " + " ".join(cli),
        "processes": "1 (reader thread + network on the main thread + writer thread)",
        **m,
        "log": str(log),
    }


def run_nnunet(args, dataset: Path, inp: Path, out: Path, results: Path, plans_json: Path, scratch: Path):
    shutil.rmtree(out, ignore_errors=True)
    cli = [
        "-i",
        str(inp),
        "-o",
        str(out),
        "-d",
        str(_dataset_id(dataset.name)),
        "-c",
        CONFIG,
        "-f",
        str(FOLD),
    ]
    cli += ["-step_size", str(args.step_size), "-device", args.device, "-npp", str(args.nnunet_npp)]
    cli += ["-nps", str(args.nnunet_nps), "--disable_progress_bar"]
    if args.no_mirroring:
        cli.append("--disable_tta")
    threads = args.threads if args.device == "cpu" else 0
    cmd = [str(args.nnunet_python), "-c", NNUNET_LAUNCH, str(threads), *cli]
    env = nnunet_env(args.nnunet_python, plans_json.parent.parent, scratch / "nnunet_raw", results)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = scratch / "nnunet_predict.log"
    m = measure(cmd, env, log, args.timeout)
    return {
        "framework": "nnU-Net v2",
        "command": "nnUNetv2_predict " + " ".join(cli),
        "processes": f"1 main + {args.nnunet_npp} preprocessing + {args.nnunet_nps} export",
        **m,
        "log": str(log),
    }


def _written(out: Path, cases: list[str], ending: str) -> list[str]:
    return [c for c in cases if not (out / f"{c}{ending}").is_file()]


def agreement(a_dir: Path, n_dir: Path, cases: list[str], ending: str, labels: dict) -> list[dict]:
    import nibabel as nib
    import numpy as np

    rows = []
    for c in cases:
        a_img, n_img = nib.load(str(a_dir / f"{c}{ending}")), nib.load(str(n_dir / f"{c}{ending}"))
        a, n = np.asanyarray(a_img.dataobj), np.asanyarray(n_img.dataobj)
        row = {"case": c, "shape_autoseg": list(a.shape), "shape_nnunet": list(n.shape)}
        row["same_affine"] = bool(np.allclose(a_img.affine, n_img.affine, atol=1e-3))
        if a.shape != n.shape:
            rows.append(row)
            continue
        row["voxel_agreement"] = float((a == n).mean())
        dice = {}
        for name, v in labels.items():
            if v == 0:
                continue
            x, y = a == v, n == v
            s = int(x.sum()) + int(y.sum())
            if s:
                dice[name] = 2 * int((x & y).sum()) / s
        row["dice"] = dice
        row["voxels_per_label_autoseg"] = {int(k): int(v) for k, v in zip(*np.unique(a, return_counts=True))}
        row["voxels_per_label_nnunet"] = {int(k): int(v) for k, v in zip(*np.unique(n, return_counts=True))}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------ report


def table(results: list[dict], n_cases: int) -> tuple[str, dict]:
    lines = [
        "| framework | wall s | s/case | peak RSS (tree) | peak PSS (tree) | max 1-proc RSS | processes | load1 at end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['framework']} | FAILED ({r['error']}) | | | | | | |")
            continue
        lines.append(
            f"| {r['framework']} | {r['process_wall_s']:.1f} | {r['process_wall_s'] / n_cases:.1f} "
            f"| {_gb(r['tree_peak_rss_bytes'])} | {_gb(r['tree_peak_pss_bytes'])} "
            f"| {_gb(r['max_single_rss_bytes'])} | {r['processes']} | {r['loadavg_1min_at_end']:.2f} |"
        )
    ok = {r["framework"]: r for r in results if not r.get("error")}
    ratios = {}
    if len(ok) == 2:
        a, n = ok["autoseg"], ok["nnU-Net v2"]
        ratios = {
            "speedup_nnunet_wall_over_autoseg_wall": n["process_wall_s"] / a["process_wall_s"],
            "peak_rss_autoseg_over_nnunet": a["tree_peak_rss_bytes"] / n["tree_peak_rss_bytes"],
        }
        if a["tree_peak_pss_bytes"] and n["tree_peak_pss_bytes"]:
            ratios["peak_pss_autoseg_over_nnunet"] = a["tree_peak_pss_bytes"] / n["tree_peak_pss_bytes"]
        pss = ratios.get("peak_pss_autoseg_over_nnunet")
        lines.append(
            f"| **ratio** | **{ratios['speedup_nnunet_wall_over_autoseg_wall']:.2f}× faster** "
            f"(nnU-Net wall / autoseg wall) | | **{ratios['peak_rss_autoseg_over_nnunet']:.2f}×** "
            f"(autoseg / nnU-Net) | {'–' if pss is None else f'{pss:.2f}×'} | | | |"
        )
    return "\n".join(lines), ratios


# -------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dataset", default="Dataset001_BraTS2015DeepMedic", help="folder name under --data-root"
    )
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--cases", type=int, default=4, help="predict the first N cases of imagesTr (default 4)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--no-mirroring", action="store_true", help="no test-time mirroring (both frameworks)")
    ap.add_argument(
        "--autoseg-mirror-axes",
        default=None,
        help="autoseg mirrors only these patch axes (e.g. '2'; '' = none), as find-best's "
        "inference_instructions.json records for a dataset; nnU-Net keeps its 8 passes",
    )
    ap.add_argument("--step-size", type=float, default=0.5, help="tile step as a fraction of the patch")
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads on CPU, both (default: all cores)"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the random network weights")
    ap.add_argument(
        "--nnunet-npp", type=int, default=1, help="nnUNetv2_predict -npp (preprocessing processes)"
    )
    ap.add_argument("--nnunet-nps", type=int, default=1, help="nnUNetv2_predict -nps (export processes)")
    ap.add_argument("--nnunet-python", type=Path, default=DEFAULT_NNUNET_PYTHON)
    ap.add_argument(
        "--nnunet-preprocessed",
        type=Path,
        default=None,
        help="nnUNet_preprocessed root with the dataset's nnUNetPlans.json (default: $nnUNet_preprocessed, "
        "then /work/nnunet_cmp/preprocessed_full, /work/nnunet_cmp/preprocessed; else planned into --scratch)",
    )
    ap.add_argument("--skip-nnunet", action="store_true")
    ap.add_argument("--skip-autoseg", action="store_true", help="measure nnU-Net alone")
    ap.add_argument("--nnunet-first", action="store_true", help="run nnU-Net before autoseg")
    ap.add_argument("--skip-estimate", action="store_true", help="do not time one tile first")
    ap.add_argument(
        "--estimate", action="store_true", help="only time one tile and print the expected duration"
    )
    ap.add_argument("--workers", type=int, default=2, help="processes for autoseg planning, if needed")
    default_python = REPO / ".venv" / "bin" / "python"
    ap.add_argument(
        "--autoseg-python", default=str(default_python if default_python.is_file() else sys.executable)
    )
    ap.add_argument("--workdir", type=Path, default=None, help="autoseg WORK folder (reused when planned)")
    ap.add_argument("--scratch", type=Path, default=None, help="logs, weights, outputs (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per framework before it is killed")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument(
        "--autoseg-compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="autoseg predict --compile (default auto, autoseg's own default)",
    )
    ap.add_argument(
        "--earlier",
        type=Path,
        default=None,
        help="take the figures of each framework this --json of an earlier run holds (same --scratch, its "
        "label maps still there) instead of running it again: on a small machine each framework can then be "
        "timed alone, at a different moment, and the two are still compared",
    )
    args = ap.parse_args(argv)
    args.match_axes = False  # prepare_autoseg: nnU-Net's lists verbatim (same tensor shapes)
    earlier_runs: dict[str, dict] = {}
    if args.earlier is not None:
        earlier = json.loads(args.earlier.read_text())
        same = {k: earlier.get(k) for k in ("dataset", "device", "threads", "step_size", "mirroring")}
        want = {
            "dataset": args.dataset,
            "device": args.device,
            "threads": args.threads,
            "step_size": args.step_size,
            "mirroring": not args.no_mirroring,
        }
        if same != want:
            raise SystemExit(f"{args.earlier}: measured with {same}, not {want}")
        for name, r in earlier["results"].items():
            if not r.get("error"):
                earlier_runs[name] = {**r, "from": str(args.earlier), "cases": earlier["cases"]}
        if not earlier_runs:
            raise SystemExit(f"{args.earlier}: holds no successful run")
        axes = earlier.get("autoseg_mirror_axes")
        if "autoseg" in earlier_runs and axes != args.autoseg_mirror_axes:
            raise SystemExit(
                f"{args.earlier}: autoseg ran with --autoseg-mirror-axes {axes!r}, not {args.autoseg_mirror_axes!r}"
            )
        args.skip_autoseg = args.skip_autoseg or "autoseg" in earlier_runs
        args.skip_nnunet = args.skip_nnunet or "nnU-Net v2" in earlier_runs

    dataset = args.data_root / args.dataset
    if not (dataset / "dataset.json").is_file():
        raise SystemExit(f"{dataset}: dataset.json not found (is ../shared/data there?)")
    spec = json.loads((dataset / "dataset.json").read_text())
    ending, n_ch = spec.get("file_ending", ".nii.gz"), len(spec["channel_names"])
    scratch = (args.scratch or Path(tempfile.mkdtemp(prefix="bench_predict_"))).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    work = (args.workdir or scratch / f"autoseg_work_{args.dataset}").resolve()
    all_cases = _case_ids(dataset, ending)
    cases = all_cases[: max(1, args.cases)]
    for r in earlier_runs.values():
        if r["cases"] != cases:
            raise SystemExit(f"{args.earlier}: predicted cases {r['cases']}, not {cases}")

    with_nnunet = not args.skip_nnunet and args.nnunet_python.is_file()
    if not args.skip_nnunet and not with_nnunet:
        print(
            f"nnU-Net's interpreter {args.nnunet_python} does not exist: measuring autoseg alone "
            "(pass --nnunet-python PATH to nnU-Net v2's venv python)",
            flush=True,
        )
    plans_json = find_nnunet_plans(args, dataset, scratch, with_nnunet)
    if plans_json is not None:
        print(f"nnU-Net plans: {plans_json}", flush=True)
    nn_plans = json.loads(plans_json.read_text()) if plans_json else None
    mapping = prepare_autoseg(args, dataset, nn_plans, work)
    print(
        f"autoseg '{AUTOSEG_CONFIG}': patch {mapping['patch_size']}, features {mapping['features_per_stage']}, "
        f"strides {mapping['strides']}",
        flush=True,
    )

    nn_median = mapping.get("nnunet_median_shape")
    if nn_median and [round(v) for v in nn_median] != [round(v) for v in mapping["autoseg_median_shape"]]:
        print(
            f"WARNING: autoseg's median shape {mapping['autoseg_median_shape']} (its axis order) differs from "
            f"nnU-Net's {nn_median}: nnU-Net's patch is applied to differently ordered (or sized) arrays, so "
            "tile counts, timings and label maps are not comparable on this dataset",
            flush=True,
        )
    weights = make_weights(args, work, scratch)
    print(
        f"weights: random init, torch.manual_seed({args.seed}), {weights['params']:,} parameters, autoseg "
        f"checkpoint {weights['checkpoint']}",
        flush=True,
    )
    shape = mapping["autoseg_median_shape"]
    tiles = _tile_count(shape, mapping["patch_size"], args.step_size)
    flips = 1 if args.no_mirroring else 8
    estimate = None
    if "tile_forward_s" in weights:
        t = weights["tile_forward_s"]
        estimate = t * tiles * flips * len(cases)
        print(
            f"estimate: one {mapping['patch_size']} tile forward {t:.1f} s on {args.threads} thread(s) here; "
            f"median case {shape} = {tiles} tiles × {flips} flip(s) → ~{estimate / 60:.1f} min of network time "
            f"per framework for {len(cases)} case(s) (load average {os.getloadavg()[0]:.2f})",
            flush=True,
        )
    if args.estimate:
        return 0

    results_root = scratch / "nnunet_results"
    conversion = None
    if with_nnunet:
        conversion = convert_for_nnunet(
            args, dataset, plans_json, Path(weights["weights_file"]), results_root, scratch
        )
        print(
            f"weight mapping: {conversion['n_pairs']} tensor pairs (autoseg {conversion['n_tensors_autoseg']}, "
            f"nnU-Net {conversion['n_tensors_nnunet']} unique parameters), parameters autoseg "
            f"{conversion['params_autoseg']:,} / nnU-Net {conversion['params_nnunet']:,}, "
            f"{'every shape matches' if not conversion['problems'] else 'PROBLEMS: ' + '; '.join(conversion['problems'])}",
            flush=True,
        )
        for a, n, s in conversion["examples"]:
            print(f"  {a} → {n} {s}", flush=True)
        if conversion["problems"]:
            raise SystemExit("the two networks do not match; not benchmarking")
        print(
            f"logits on one random input {weights['equivalence_input']}: max |autoseg − nnU-Net| = "
            f"{conversion['max_abs_diff']:.2e} (max |logit| {conversion['max_abs_logit']:.2f}; argmax agrees on "
            f"{100 * conversion['argmax_agreement']:.3f} % of voxels)",
            flush=True,
        )

    inp = scratch / "input"
    make_input(dataset, cases, n_ch, ending, inp)
    out_a, out_n = scratch / "pred_autoseg", scratch / "pred_nnunet"
    runs = []
    if not args.skip_autoseg:
        runs.append("autoseg")
    if with_nnunet:
        runs.insert(0 if args.nnunet_first else len(runs), "nnunet")
    load_before = os.getloadavg()[0]
    results = []
    for which in runs:
        print(f"{which}: predicting {len(cases)} case(s) on {args.device} ...", flush=True)
        if which == "autoseg":
            r = run_autoseg(args, work, inp, out_a, scratch)
            missing = _written(out_a, cases, ending)
        else:
            r = run_nnunet(args, dataset, inp, out_n, results_root, plans_json, scratch)
            missing = _written(out_n, cases, ending)
        if r["returncode"] != 0 or missing:
            r["error"] = f"exit {r['returncode']}, missing outputs {missing}; see {r['log']}"
            print(f"{r['framework']} FAILED: {r['error']}\n{_tail(Path(r['log']))}", flush=True)
        else:
            print(
                f"{r['framework']}: {r['process_wall_s']:.1f} s, peak tree RSS {_gb(r['tree_peak_rss_bytes'])}",
                flush=True,
            )
        results.append(r)
    for name, r in earlier_runs.items():
        missing = _written(out_a if name == "autoseg" else out_n, cases, ending)
        if missing:
            raise SystemExit(f"{args.earlier}: {name}'s outputs {missing} are no longer in {scratch}")
        print(
            f"{name} (from {args.earlier}): {r['process_wall_s']:.1f} s, peak tree RSS "
            f"{_gb(r['tree_peak_rss_bytes'])}",
            flush=True,
        )
        results.append(r)

    agree = []
    ok = {r["framework"] for r in results if not r.get("error")}
    if ok == {"autoseg", "nnU-Net v2"}:
        agree = agreement(out_a, out_n, cases, ending, spec["labels"])

    text, ratios = table(results, len(cases))
    print()
    print(text)
    mirror = "off" if args.no_mirroring else "on (3 axes, 8 passes per tile)"
    if not args.no_mirroring and args.autoseg_mirror_axes is not None:
        mirror += f" in nnU-Net; autoseg mirrors axes [{args.autoseg_mirror_axes}] only"
    print(
        f"\n{args.dataset}: {len(cases)} case(s) {cases}; device {args.device}; {args.threads} torch thread(s); "
        f"step {args.step_size}; mirroring {mirror}; {os.cpu_count()} CPU core(s) here "
        f"({platform.processor() or platform.machine()}); 1-min load average {load_before:.2f} before the runs."
    )
    print(
        f"network: nnU-Net {CONFIG} PlainConvUNet plan, patch {mapping['patch_size']}, "
        f"{weights['params']:,} parameters, RANDOM weights (torch.manual_seed({args.seed}), no training: "
        "speed benchmark only; the label maps are not segmentations)"
    )
    if conversion:
        print(
            f"same weights: logits max abs diff {conversion['max_abs_diff']:.2e} on a random "
            f"{weights['equivalence_input']} input"
        )
    for r in results:
        print(f"{r['framework']}: {r['command']}")
    for row in agree:
        if "dice" not in row:
            print(f"agreement {row['case']}: shapes differ {row['shape_autoseg']} vs {row['shape_nnunet']}")
            continue
        dice = ", ".join(f"{k} {v:.4f}" for k, v in row["dice"].items()) or "no foreground in either"
        print(
            f"agreement {row['case']}: voxels equal {100 * row['voxel_agreement']:.3f} %; Dice {dice}; "
            f"same affine {row['same_affine']}"
        )
    for name, r in earlier_runs.items():
        print(
            f"{name}'s figures are from an earlier run ({args.earlier}, 1-min load "
            f"{r.get('loadavg_1min_at_end', float('nan')):.2f} at its end), same inputs and weights"
        )
    if not with_nnunet and "nnU-Net v2" not in earlier_runs:
        print("nnU-Net v2 was not run, so there is no ratio.")
    print(f"logs and outputs in {scratch}")
    if args.json:
        payload = {
            "dataset": args.dataset,
            "cases": cases,
            "device": args.device,
            "threads": args.threads,
            "step_size": args.step_size,
            "mirroring": not args.no_mirroring,
            "autoseg_compile": args.autoseg_compile,
            "autoseg_mirror_axes": args.autoseg_mirror_axes,
            "earlier": str(args.earlier) if args.earlier else None,
            "cpu_count": os.cpu_count(),
            "loadavg_1min_before": load_before,
            "plan": mapping,
            "weights": {k: v for k, v in weights.items() if k != "weights_file"},
            "estimate_network_s_per_framework": estimate,
            "tiles_per_median_case": tiles,
            "conversion": conversion,
            "results": {r["framework"]: r for r in results},
            "ratios": ratios,
            "agreement": agree,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"figures written to {args.json}")
    return 0 if all(not r.get("error") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
