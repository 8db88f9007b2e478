"""What the stored signed distance maps of the boundary loss cost and save (docs/recipes.md, boundary loss).

    python scripts/bench_boundary_maps.py DATASET WORK [--config 3d_fullres] [--batches 10] [--run-iters 0]

Plans and preprocesses DATASET into WORK (once), then reports:
- per case: the time to make its maps and their size on disk, against its image and label files;
- the data and loss path of one training step of ``dice+ce+0.01*boundary`` on the configuration's patch
  and batch: making a batch (sampling + augmentation) without / with the maps, and the loss's forward +
  backward on deep-supervision outputs of the plan's shapes, computing the maps per patch (before) / using
  the batch's maps (after), and ``dice+ce`` alone for reference. The network's own forward and backward are the same
  either way and are not timed here;
- with ``--run-iters N``: two short training runs (fold ``all``, one epoch of N iterations, no validation,
  augmentation in the training process, the planned network) of ``dice+ce+0.01*boundary``, per-patch maps
  (the stored maps switched off) and stored maps, as seconds per iteration of the training loop.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from autoseg import api
from autoseg.layout import WorkDir
from autoseg.networks import build_network
from autoseg.planning.plans import Plans
from autoseg.preprocessing.distance_maps import FOLDER, ensure_distance_maps, map_channels, map_file
from autoseg.settings import TrainSettings
from autoseg.training.augmentation import augmentation_patch_size
from autoseg.training.dataloader import BatchMaker, LoaderSpec
from autoseg.training.run import make_loss


def _mib(path: Path) -> float:
    return path.stat().st_size / 2**20


def maps_cost(work: WorkDir, plans: Plans, config: str) -> None:
    data = work.preprocessed(plans.configuration(config).data_identifier)
    ids = sorted(p.stem for p in data.glob("*.json"))
    for c in ids:
        map_file(data, c).unlink(missing_ok=True)
    total = 0.0
    for c in ids:
        t = time.perf_counter()
        ensure_distance_maps(data, [c], map_channels(plans), plans.ignore_label)
        s = time.perf_counter() - t
        total += s
        shape = np.load(data / f"{c}_seg.npy", mmap_mode="r").shape
        print(
            f"{c}: {'x'.join(map(str, shape))}, {len(map_channels(plans))} map(s) in {s:.2f} s; "
            f"maps {_mib(map_file(data, c)):.1f} MiB, image {_mib(data / f'{c}.npy'):.1f} MiB, "
            f"label {_mib(data / f'{c}_seg.npy'):.1f} MiB"
        )
    size = sum(f.stat().st_size for f in (data / FOLDER).iterdir()) / 2**20
    print(f"all {len(ids)} cases: {total:.1f} s, {size:.1f} MiB in {data / FOLDER}")


def _output_shapes(plans: Plans, config_name: str) -> list[tuple[int, ...]]:
    """Shapes of the plan's network's deep-supervision outputs (run on the meta device: no compute)."""
    config = plans.configuration(config_name)
    with torch.device("meta"):
        net = build_network(config.network, plans.input_channels(config_name), plans.num_outputs)
        outs = net(torch.zeros(config.batch_size, plans.input_channels(config_name), *config.patch_size))
    return [tuple(o.shape) for o in (outs if isinstance(outs, (list, tuple)) else [outs])]


def step_path(work: WorkDir, plans: Plans, config_name: str, batches: int) -> None:
    config = plans.configuration(config_name)
    settings = TrainSettings(loss="dice+ce+0.01*boundary")
    data = work.preprocessed(config.data_identifier)
    spec = LoaderSpec(
        data_dir=data,
        case_ids=tuple(sorted(p.stem for p in data.glob("*.json"))),
        previous_dir=None,
        extract_size=tuple(augmentation_patch_size(config.patch_size, settings.augmentation)),
        patch_size=tuple(config.patch_size),
        batch_size=config.batch_size,
        dim=config.dim,
        oversample_foreground=settings.oversample_foreground,
        augmentation=settings.augmentation,
        num_classes=plans.num_classes,
        seed=0,
        fold_index=0,
        distance_maps=True,
    )
    loss_fn = make_loss(plans, config.batch_dice, settings.loss)
    plain_loss = make_loss(plans, config.batch_dice, "dice+ce")
    shapes = _output_shapes(plans, config_name)
    print(f"{config_name}: patch {config.patch_size}, batch {config.batch_size}, outputs {shapes}")
    makers = {
        "before (maps per patch)": BatchMaker(replace(spec, distance_maps=False)),
        "after (stored maps)": BatchMaker(spec),
    }
    maker = makers["after (stored maps)"]
    made: dict[str, list[float]] = {k: [] for k in makers}
    lossed: dict[str, list[float]] = {k: [] for k in makers}
    for i in range(batches):  # before and after alternate, so the machine's load weighs on both alike
        for label, m in makers.items():
            t = time.perf_counter()
            b = m.make(0, i)
            made[label].append(time.perf_counter() - t)
            outs = [torch.randn(shape, requires_grad=True) for shape in shapes]
            maps = torch.from_numpy(b["dist"]) if "dist" in b else None
            t = time.perf_counter()
            loss_fn(outs, torch.from_numpy(b["seg"]), maps).backward()
            lossed[label].append(time.perf_counter() - t)
    for label in makers:
        batch_s, loss_s = np.median(made[label]), np.median(lossed[label])
        print(
            f"  {label}: batch {batch_s:.3f} s, loss fwd+bwd {loss_s:.3f} s, together {batch_s + loss_s:.3f} s "
            "(medians)"
        )
    plain = []
    for i in range(batches):
        b = maker.make(1, i)
        outs = [torch.randn(shape, requires_grad=True) for shape in shapes]
        t = time.perf_counter()
        plain_loss(outs, torch.from_numpy(b["seg"])).backward()
        plain.append(time.perf_counter() - t)
    print(f"  dice+ce alone: loss fwd+bwd {np.median(plain):.3f} s (median)")


def short_runs(work: WorkDir, config_name: str, iters: int) -> None:
    """Seconds per iteration of two short runs: maps per patch (stored maps switched off), stored maps."""
    from autoseg.training import run as run_module
    from autoseg.training.loop import train_fold

    settings = TrainSettings(
        epochs=1, iters_per_epoch=iters, val_iters=0, loader_workers=0, loss="dice+ce+0.01*boundary"
    )
    uses = run_module.uses_distance_maps
    for label, switch in (("before (maps per patch)", lambda loss: False), ("after (stored maps)", uses)):
        run_module.uses_distance_maps = switch
        try:
            train_fold(work, config_name, "all", settings, torch.device("cpu"), overwrite=True)
        finally:
            run_module.uses_distance_maps = uses
        report = json.loads((work.fold_dir(config_name, "all") / WorkDir.LOG).read_text().splitlines()[-1])
        per_step = report["train_seconds"] / report["iterations"]
        wait = report["data_wait_seconds"] / report["iterations"]
        print(f"  run, {label}: {per_step:.2f} s per iteration ({wait:.2f} s of it waiting for batches)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("work")
    ap.add_argument("--config", default="3d_fullres")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--run-iters", type=int, default=0)
    ap.add_argument("--skip-maps", action="store_true", help="keep the stored maps, do not time making them")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = WorkDir(Path(args.work))
    if not work.plans.is_file():
        api.plan(args.dataset, work.root, workers=1, configurations=(args.config,))
    plans = Plans.load(work.plans)
    if not args.skip_maps:
        maps_cost(work, plans, args.config)
    step_path(work, plans, args.config, args.batches)
    if args.run_iters:
        short_runs(work, args.config, args.run_iters)


if __name__ == "__main__":
    main()
