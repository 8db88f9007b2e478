"""Command-line interface: a thin typer layer; each command is one call into :mod:`autoseg.api`."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from autoseg import api
from autoseg.errors import AutosegError
from autoseg.planning.memory import ARCHITECTURES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Self-configuring 3D medical image segmentation: plan → train → predict → evaluate.",
)
err = Console(stderr=True)
out = Console()
# the architectures the planner has a memory model for (each is registered in autoseg.networks)
Architecture = Enum("Architecture", {name: name for name in ARCHITECTURES}, type=str)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


def _stage_progress(bar: Progress):
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total, info="")
        bar.update(tasks[stage], completed=done)

    return update


@app.command()
def plan(
    dataset_dir: Annotated[
        Path, typer.Argument(help="Raw dataset folder (dataset.json, imagesTr, labelsTr)")
    ],
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Folder for everything derived")],
    gpu_memory: Annotated[
        float | None,
        typer.Option(
            "--gpu-memory", help="GPU memory budget of a training step, GB (default 8, or --device's)"
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="cuda: size the plans for this machine's GPU (90% of its memory)"),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", min=1, help="Parallel processes")] = 2,
    resample_device: Annotated[
        str | None,
        typer.Option("--resample-device", help="cpu or cuda: resample with torch (faster) instead of scipy"),
    ] = None,
    clean: Annotated[bool, typer.Option("--clean", help="Recompute fingerprint and preprocessing")] = False,
    explain: Annotated[
        bool, typer.Option("--explain", help="Print every planning decision and its reason")
    ] = False,
    architecture: Annotated[
        Architecture, typer.Option("--architecture", help="Network to plan and size for")
    ] = Architecture.unet,
) -> None:
    """Fingerprint the dataset, write plans.json and preprocess every case."""
    with _progress() as bar:
        plans = api.plan(
            dataset_dir,
            workdir,
            gpu_memory_gb=gpu_memory,
            device=device,
            resample_device=resample_device,
            workers=workers,
            clean=clean,
            progress=_stage_progress(bar),
            architecture=architecture.value,
        )
    table = Table(
        title=f"plans for {plans.dataset_name or dataset_dir.name} ({plans.gpu_memory_gb:g} GB budget)"
    )
    columns = ("config", "spacing mm", "patch", "batch", "stages", "memory GB", "step s GPU/CPU")
    for col in columns:
        table.add_column(col)
    for name, c in plans.configurations.items():
        step = c.estimated_step_seconds
        table.add_row(
            name,
            "×".join(f"{s:.3g}" for s in c.spacing),
            "×".join(map(str, c.patch_size)),
            str(c.batch_size),
            str(c.network.n_stages),
            f"{c.estimated_memory_gb:.2f}",
            f"{step.get('gpu', float('nan')):.3f}/{step.get('cpu', float('nan')):.1f}",
        )
    out.print(table)
    if explain:
        for r in plans.reasons:
            out.print(f"• {r}")
    out.print(f"plans written to {Path(workdir) / 'plans.json'}")


@app.command()
def train(
    workdir: Annotated[Path, typer.Argument(help="WORK folder made by 'autoseg plan'")],
    config: Annotated[str, typer.Argument(help="Configuration: 2d or 3d_fullres")],
    fold: Annotated[str, typer.Argument(help="Fold 0-4, or 'all' to train on every case")],
    epochs: Annotated[int | None, typer.Option(help="Number of epochs (default 1000)")] = None,
    iters_per_epoch: Annotated[int | None, typer.Option(help="Iterations per epoch (default 250)")] = None,
    val_iters: Annotated[
        int | None, typer.Option(help="Validation iterations per epoch (default 50)")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from checkpoint_latest.pt")] = False,
    config_file: Annotated[
        Path | None, typer.Option("--config-file", help="TOML settings (see configs/default.toml)")
    ] = None,
    no_mirroring: Annotated[
        bool, typer.Option("--no-mirroring", help="No test-time mirroring in the final validation")
    ] = False,
) -> None:
    """Train one fold of a configuration, then predict and score its validation cases."""
    if fold != "all" and fold not in {"0", "1", "2", "3", "4"}:
        raise AutosegError(f"fold must be 0-4 or 'all', got '{fold}'")
    interactive = err.is_terminal
    with _progress() as bar:
        task = bar.add_task("epoch", total=None, info="", visible=interactive)

        def on_iteration(i: int, n: int, loss: float) -> None:
            bar.update(task, completed=i, total=n, info=f"loss {loss:.3f}")

        def on_epoch(r) -> None:
            dice = " ".join(f"{k} {v:.3f}" for k, v in r.pseudo_dice.items())
            bar.console.print(
                f"epoch {r.epoch}/{r.epochs}  train loss {r.train_loss:.4f}"
                + (f"  val loss {r.val_loss:.4f}" if r.val_loss is not None else "")
                + (f"  pseudo-Dice {dice}" if dice else "")
                + f"  lr {r.lr:.2e}  {r.seconds:.1f}s"
            )
            bar.update(task, description=f"epoch {r.epoch + 1}", completed=0)

        fold_dir = api.train(
            workdir,
            config,
            fold,
            device=device,
            resume=resume,
            config_file=config_file,
            on_iteration=on_iteration,
            on_epoch=on_epoch,
            epochs=epochs,
            iters_per_epoch=iters_per_epoch,
            val_iters=val_iters,
            mirroring=False if no_mirroring else None,
        )
    summary = fold_dir / "validation" / "summary.json"
    if summary.is_file():
        _print_summary(summary)
    out.print(f"results in {fold_dir}")


@app.command()
def predict(
    workdir: Annotated[Path, typer.Argument(help="WORK folder with trained folds")],
    input_path: Annotated[
        Path, typer.Argument(metavar="INPUT", help="Folder of <case>_<cccc> images, or one image")
    ],
    output: Annotated[Path, typer.Argument(help="Output folder for <case><ending> label maps")],
    config: Annotated[str, typer.Option("--config", "-c")] = "3d_fullres",
    folds: Annotated[
        list[str] | None, typer.Option("--folds", "-f", help="Folds to ensemble, or 'all'")
    ] = None,
    step: Annotated[float, typer.Option("--step", help="Tile step as a fraction of the patch")] = 0.5,
    no_mirroring: Annotated[bool, typer.Option("--no-mirroring")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps")] = "auto",
    continue_: Annotated[bool, typer.Option("--continue", help="Skip cases already written")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs")] = False,
) -> None:
    """Sliding-window prediction, fold ensembling, export in the input's geometry."""
    fold_list: list[int | str] | None = None
    if folds:
        fold_list = ["all" if f == "all" else int(f) for f in folds]
    with _progress() as bar:
        task = bar.add_task("predict", total=None, info="")
        written = api.predict(
            workdir,
            input_path,
            output,
            config=config,
            folds=fold_list,
            step_size=step,
            mirroring=not no_mirroring,
            device=device,
            continue_=continue_,
            overwrite=overwrite,
            progress=lambda case, done, total: bar.update(task, completed=done, total=total, info=case),
        )
    out.print(f"{len(written)} prediction(s) written to {output}")


@app.command()
def evaluate(
    reference_dir: Annotated[Path, typer.Argument(help="Folder of reference label maps")],
    prediction_dir: Annotated[Path, typer.Argument(help="Folder of predicted label maps")],
    dataset_json: Annotated[Path, typer.Option("--dataset-json", help="The dataset's dataset.json")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="summary.json path")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", min=1)] = 2,
) -> None:
    """Dice, IoU, surface distances per case and label; summary.json and per_case.csv."""
    api.evaluate(reference_dir, prediction_dir, dataset_json, output, workers=workers)
    _print_summary(output or prediction_dir / "summary.json")


@app.command()
def phantom(
    out_dir: Annotated[Path, typer.Argument(help="Empty folder for the synthetic dataset")],
    cases: Annotated[int, typer.Option("--cases", "-n", min=2)] = 10,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Write a deterministic synthetic 2-channel, 2-label 3D dataset in the raw layout."""
    from autoseg.phantom import make_phantom_dataset

    make_phantom_dataset(out_dir, n_cases=cases, seed=seed)
    out.print(f"phantom dataset with {cases} cases written to {out_dir}")


def _print_summary(path: Path) -> None:
    from autoseg.jsonio import read_json

    s = read_json(path)
    table = Table(title=f"mean over cases ({path})")
    table.add_column("label")
    table.add_column("Dice")
    table.add_column("IoU")
    table.add_column("HD95 (mm)")
    for label, m in s.get("mean", {}).items():
        table.add_row(label, *(_mean_of(m, key) for key in ("dice", "iou", "hd95_mm")))
    out.print(table)
    if s.get("mean_dice") is not None:
        out.print(f"mean Dice {s['mean_dice']:.4f}")


def _mean_of(metrics: dict, key: str) -> str:
    v = metrics.get(key, {})
    v = v.get("mean") if isinstance(v, dict) else v
    return "n/a" if v is None else f"{v:.4f}"


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2 (usage errors too); Ctrl-C exits 130."""
    try:
        app(args=argv, standalone_mode=True)  # handles usage errors and --help itself, then exits
    except AutosegError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
