"""Command-line interface: a thin typer layer; each command is one call into :mod:`autoseg.api`."""

from __future__ import annotations

import logging
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
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

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Self-configuring 3D medical image segmentation: plan → train → predict → evaluate.",
)
err = Console(stderr=True)
out = Console()
MissingDistance = Enum("MissingDistance", {"skip": "skip", "worst": "worst"}, type=str)
TRAIN = api.TrainSettings  # option defaults are the settings' own (written once, in autoseg.settings)
INFER = api.InferenceSettings


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
        disable=not err.is_terminal,  # logs and pipes get the one-line results, not bar frames
    )


def _stage_progress(bar: Progress):
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total, info="")
        bar.update(tasks[stage], completed=done)

    return update


# plan's options
_PlanDatasetDir = Annotated[
    Path, typer.Argument(help="Raw dataset folder (dataset.json, imagesTr, labelsTr)")
]
_PlanGpuMemory = Annotated[
    float | None,
    typer.Option(
        "--gpu-memory",
        help=f"GPU memory budget of a training step, GB (default {api.DEFAULT_GPU_MEMORY_GB:g}, or --device's)",
    ),
]
_PlanDevice = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="cuda: size the plans for this machine's GPU (90% of its memory); with --time-budget, the device "
        "the budget is for (cpu, cuda, mps; default: the best one here)",
    ),
]
_PlanTimeBudget = Annotated[
    float | None,
    typer.Option(
        "--time-budget",
        help="Minutes of training: add 3d_budget, sized so that a run of this length on --device learns well",
    ),
]
_PlanStepCache = Annotated[
    Path | None,
    typer.Option(
        "--step-cache", help="JSON file of timed training steps (default ~/.cache/autoseg/step_times.json)"
    ),
]
_PlanMinSteps = Annotated[
    int | None,
    typer.Option(
        "--min-steps",
        help="with --time-budget: optimisation steps the budget must buy (default 400; fewer buys a finer "
        "spacing, see docs/planning.md)",
    ),
]
_PlanResampleDevice = Annotated[
    str | None,
    typer.Option("--resample-device", help="cpu or cuda: resample with torch (faster) instead of scipy"),
]
_PlanExplain = Annotated[bool, typer.Option("--explain", help="Print every planning decision and its reason")]
_PlanArchitecture = Annotated[
    str,
    typer.Option(
        "--architecture",
        help=f"Network(s) to plan and size for: one of {', '.join(api.architectures())}, or a comma list "
        "(one configuration per resolution and network, e.g. 3d_fullres_unetpp; unet keeps the plain names)",
    ),
]
_PlanFixNonfinite = Annotated[
    bool,
    typer.Option("--fix-nonfinite", help="Replace NaN/Inf intensities by the image's finite min/max (warns)"),
]


@app.command()
def plan(
    dataset_dir: _PlanDatasetDir,
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Folder for everything derived")],
    gpu_memory: _PlanGpuMemory = None,
    device: _PlanDevice = None,
    workers: Annotated[
        int, typer.Option("--workers", "-j", min=1, help="Parallel processes")
    ] = api.DEFAULT_WORKERS,
    resample_device: _PlanResampleDevice = None,
    clean: Annotated[bool, typer.Option("--clean", help="Recompute fingerprint and preprocessing")] = False,
    explain: _PlanExplain = False,
    architecture: _PlanArchitecture = "unet",
    fix_nonfinite: _PlanFixNonfinite = False,
    time_budget: _PlanTimeBudget = None,
    step_cache: _PlanStepCache = None,
    min_steps: _PlanMinSteps = None,
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
            architecture=architecture,
            fix_nonfinite=fix_nonfinite,
            time_budget=time_budget,
            step_cache=step_cache,
            min_steps=min_steps,
        )
    table = Table(
        title=f"plans for {plans.dataset_name or dataset_dir.name} ({plans.gpu_memory_gb:g} GB budget)"
    )
    for i, col in enumerate(api.PLAN_COLUMNS):  # the configuration's name whole, the figures wrap if need be
        table.add_column(col, no_wrap=i == 0, overflow="fold")
    for row in api.plan_rows(plans):
        table.add_row(*row)
    _print_table(table)
    if explain:
        for r in plans.reasons:
            out.print(f"• {r}")
    out.print(f"plans written to {Path(workdir) / 'plans.json'}")


# train's options
_TrainConfig = Annotated[
    str,
    typer.Argument(
        help="Configuration of the plans: 2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres, 3d_budget, or one "
        "planned for another architecture, e.g. 3d_fullres_unetpp"
    ),
]
_TrainFold = Annotated[
    str,
    typer.Argument(
        help="Fold 0 .. num_folds-1 (0-4 by default); 'all-folds' for each of them in turn; "
        "'all' to train on every case"
    ),
]
_TrainItersPerEpoch = Annotated[
    int | None, typer.Option(help=f"Iterations per epoch (default {TRAIN.iters_per_epoch})")
]
_TrainValIters = Annotated[
    int | None, typer.Option(help=f"Validation iterations per epoch (default {TRAIN.val_iters})")
]
_TrainTimeBudget = Annotated[
    float | None,
    typer.Option(
        "--time-budget",
        min=0,
        help="Minutes of training per fold: the epochs (at most --epochs) are fitted into it, "
        "the learning rate still decays to its end",
    ),
]
_TrainWorkers = Annotated[
    int | None, typer.Option("--workers", "-j", min=0, help="Augmentation processes (default: cores - 1)")
]
_TrainResume = Annotated[
    bool,
    typer.Option(
        "--resume", help=f"Continue from {api.WorkDir.CHECKPOINT_LATEST} (or extend a finished run)"
    ),
]
_TrainConfigFile = Annotated[
    Path | None, typer.Option("--config-file", help="TOML settings (see configs/default.toml)")
]
_TrainOverwrite = Annotated[
    bool, typer.Option("--overwrite", help="Delete the fold's earlier run and train from scratch")
]
_TrainDeterministic = Annotated[
    bool, typer.Option("--deterministic", help="Deterministic algorithms (bit-identical reruns on CPU)")
]
_TrainLoss = Annotated[
    str | None,
    typer.Option(
        help=f'Loss expression, e.g. "0.5*tversky(alpha=0.3,beta=0.7)+0.5*focal(gamma=2)" '
        f"(default {TRAIN.loss})"
    ),
]
_TrainOptimizer = Annotated[str | None, typer.Option(help=f"sgd, adam or adamw (default {TRAIN.optimizer})")]
_TrainSchedule = Annotated[
    str | None,
    typer.Option(
        help=f"Learning-rate schedule: poly, cosine or plateau (lowered when the validation EMA stalls; "
        f"[train] plateau_* in the settings file) (default {TRAIN.schedule})"
    ),
]
_TrainWarmup = Annotated[
    float | None,
    typer.Option(help=f"Linear warmup over this part of the run (default {TRAIN.warmup_fraction:g})"),
]
_TrainLr = Annotated[float | None, typer.Option(help=f"Initial learning rate (default {TRAIN.initial_lr:g})")]
_TrainNoMirroring = Annotated[
    bool, typer.Option("--no-mirroring", help="No test-time mirroring in the final validation")
]


@app.command()
def train(
    workdir: Annotated[Path, typer.Argument(help="WORK folder made by 'autoseg plan'")],
    config: _TrainConfig,
    fold: _TrainFold,
    epochs: Annotated[int | None, typer.Option(help=f"Number of epochs (default {TRAIN.epochs})")] = None,
    iters_per_epoch: _TrainItersPerEpoch = None,
    val_iters: _TrainValIters = None,
    time_budget: _TrainTimeBudget = None,
    workers: _TrainWorkers = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps")] = "auto",
    resume: _TrainResume = False,
    config_file: _TrainConfigFile = None,
    overwrite: _TrainOverwrite = False,
    no_compile: Annotated[bool, typer.Option("--no-compile", help="No torch.compile on CUDA")] = False,
    deterministic: _TrainDeterministic = False,
    no_mirroring: _TrainNoMirroring = False,
    loss: _TrainLoss = None,
    optimizer: _TrainOptimizer = None,
    schedule: _TrainSchedule = None,
    warmup_fraction: _TrainWarmup = None,
    initial_lr: _TrainLr = None,
) -> None:
    """Train one fold of a configuration (or all five), then predict and score its validation cases.

    Multi-GPU: torchrun --nproc_per_node N -m autoseg train WORK CONFIG FOLD (one process per GPU).
    """
    overrides = dict(
        epochs=epochs,
        iters_per_epoch=iters_per_epoch,
        val_iters=val_iters,
        time_budget_minutes=time_budget,
        loader_workers=workers,
        compile=False if no_compile else None,
        deterministic=True if deterministic else None,
        mirroring=False if no_mirroring else None,
        loss=loss,
        optimizer=optimizer,
        schedule=schedule,
        warmup_fraction=warmup_fraction,
        initial_lr=initial_lr,
    )
    runs = api.train_folds(
        workdir, config, fold, device=device, resume=resume, overwrite=overwrite, config_file=config_file,
        **overrides,
    )  # fmt: skip
    for run in runs:
        if run.finished is not None:
            if run.show:
                out.print(f"fold {run.fold}: finished earlier ({run.finished}), skipped")
            continue
        if run.announce and run.show:
            out.print(f"[bold]fold {run.fold}[/bold]")
        fold_dir = _train_one(run)
        summary = run.summary() if run.show else None
        if summary is not None:
            _print_summary(summary)
        if run.show:
            out.print(f"results in {fold_dir}", soft_wrap=True)


def _train_one(run) -> Path:
    """One fold with a live display: iteration bar (loss, iterations/s, epoch ETA), a line per epoch
    (losses, pseudo-Dice per structure, learning rate, seconds, ETA of the run)."""
    import time

    show = run.show
    with _progress() as bar:
        task = bar.add_task("epoch 1", total=None, info="", visible=show and err.is_terminal)
        started = {"t": time.perf_counter(), "epoch_seconds": []}

        def on_iteration(i: int, n: int, loss: float) -> None:
            if i == 1:
                started["t"] = time.perf_counter()
            rate = (i - 1) / max(time.perf_counter() - started["t"], 1e-9) if i > 1 else 0.0
            bar.update(task, completed=i, total=n, info=f"loss {loss:.3f}  {rate:.2f} it/s")

        def on_epoch(r) -> None:
            started["epoch_seconds"].append(r.seconds)
            recent = started["epoch_seconds"][-10:]
            eta = (r.epochs - r.epoch) * sum(recent) / len(recent)
            dice = " ".join(f"{k} {v:.3f}" for k, v in r.pseudo_dice.items() if v == v)
            bar.console.print(
                f"epoch {r.epoch}/{r.epochs}  train loss {r.train_loss:.4f}"
                + (f"  val loss {r.val_loss:.4f}" if r.val_loss is not None else "")
                + (f"  pseudo-Dice {dice}" if dice else "")
                + f"  lr {r.lr:.2e}  {r.seconds:.1f}s"
                + (
                    f" (data wait {r.data_wait_seconds:.1f}s)"
                    if r.data_wait_seconds > 0.05 * r.seconds
                    else ""
                )
                + f"  ETA {_duration(eta)}",
                soft_wrap=True,  # one line per epoch in log files too
            )
            bar.update(task, description=f"epoch {r.epoch + 1}", completed=0)

        return run.train(on_iteration=on_iteration if show else None, on_epoch=on_epoch if show else None)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# predict's options
_PredictPaths = Annotated[
    list[Path],
    typer.Argument(
        metavar="WORK INPUT... OUTPUT",
        help="WORK folder (left out with --model), then inputs: a folder of <case>_<cccc> images, image "
        "files, 4D images with channels last, or folders of DICOM series; then the output folder",
    ),
]
_PredictModel = Annotated[
    Path | None,
    typer.Option("--model", help="A model bundle from 'autoseg export-model' instead of WORK"),
]
_PredictConfig = Annotated[
    list[str] | None,
    typer.Option("--config", "-c", help="Configuration(s); several are ensembled (default: find-best's)"),
]
_PredictFolds = Annotated[list[str] | None, typer.Option("--folds", "-f", help="Folds to ensemble, or 'all'")]
_PredictStep = Annotated[float, typer.Option("--step", help="Tile step as a fraction of the patch")]
_PredictMirrorAxes = Annotated[
    str | None, typer.Option("--mirror-axes", help="Patch axes to mirror, e.g. 1,2 (default: all)")
]
_PredictSaveProbabilities = Annotated[
    bool, typer.Option("--save-probabilities", help="Also write <case>.npz probabilities (original grid)")
]
_PredictSaveUncertainty = Annotated[
    bool,
    typer.Option(
        "--save-uncertainty",
        help="Also write <case>_uncertainty.npz (float16 entropy and fold/mirror disagreement, image grid) "
        "and uncertainty.csv (per case and structure)",
    ),
]
_PredictNoPostprocessing = Annotated[
    bool, typer.Option("--no-postprocessing", help="Skip the postprocessing find-best chose")
]
_PredictNoCalibration = Annotated[
    bool,
    typer.Option("--no-calibration", help="Save probabilities without find-best's temperature scaling"),
]
_PredictFixNonfinite = Annotated[
    bool,
    typer.Option("--fix-nonfinite", help="Replace NaN/Inf intensities by the image's finite min/max (warns)"),
]
_PredictCompile = Annotated[
    str,
    typer.Option(
        "--compile",
        help="torch.compile the networks: auto (once ~30 s of network time is ahead), on, off",
    ),
]
_PredictPrecision = Annotated[
    str,
    typer.Option(
        "--precision",
        help="Forward passes: auto (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32), fp32, bf16",
    ),
]
_PredictBackend = Annotated[
    str,
    typer.Option(
        "--backend",
        help="Forward passes: torch, onnxruntime or openvino (CPU, float32; pip install "
        "'autoseg\\[onnx]' or 'autoseg\\[openvino]')",
    ),
]
_PredictExportCache = Annotated[
    str,
    typer.Option(
        "--export-cache",
        help="Folder keeping the networks --backend onnxruntime/openvino exports, so later runs skip the "
        'export; "" exports every time',
    ),
]
_PredictNoHeapReuse = Annotated[
    bool,
    typer.Option(
        "--no-heap-reuse",
        help="CPU: unmap each forward pass's memory when freed (slower, less memory held between passes)",
    ),
]
_PredictUnetppInference = Annotated[
    str,
    typer.Option(
        "--unetpp-inference",
        help="UNet++: accurate (mean of the nested heads), fast (pruned at --prune-depth), or auto "
        "(find-best's choice, else accurate)",
    ),
]
_PredictPruneDepth = Annotated[
    int,
    typer.Option(
        "--prune-depth", help="UNet++ fast mode: depth 1 .. stages-1 (0: find-best's, else deepest)"
    ),
]
_PredictOutputFormat = Annotated[
    list[str] | None,
    typer.Option(
        "--output-format",
        help="nifti (default), dicom-seg or rtstruct; repeat for several. DICOM-SEG and RT-STRUCT need "
        "DICOM series input (pip install 'autoseg\\[dicom]')",
    ),
]
_PredictChannel = Annotated[
    list[str] | None,
    typer.Option(
        "--channel",
        help="DICOM input: channel N is the series whose SeriesDescription matches, e.g. --channel 0=T1 "
        "(default: the channel names of dataset.json)",
    ),
]


def _case_progress(bar, what: str):
    """A ``progress(case, done, total)`` callback that moves one new task of ``bar`` named ``what``."""
    task = bar.add_task(what, total=None, info="")
    return lambda case, done, total: bar.update(task, completed=done, total=total, info=case)


@app.command()
def predict(
    paths: _PredictPaths,
    model: _PredictModel = None,
    config: _PredictConfig = None,
    folds: _PredictFolds = None,
    step: _PredictStep = INFER.step_size,
    no_mirroring: Annotated[bool, typer.Option("--no-mirroring", help="No test-time mirroring")] = False,
    mirror_axes: _PredictMirrorAxes = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps")] = "auto",
    continue_: Annotated[bool, typer.Option("--continue", help="Skip cases already written")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs")] = False,
    save_probabilities: _PredictSaveProbabilities = False,
    save_uncertainty: _PredictSaveUncertainty = False,
    no_postprocessing: _PredictNoPostprocessing = False,
    fix_nonfinite: _PredictFixNonfinite = False,
    compile_: _PredictCompile = INFER.compile,
    precision: _PredictPrecision = INFER.precision,
    backend: _PredictBackend = INFER.backend,
    export_cache: _PredictExportCache = INFER.export_cache,
    no_heap_reuse: _PredictNoHeapReuse = False,
    no_calibration: _PredictNoCalibration = False,
    output_format: _PredictOutputFormat = None,
    channel: _PredictChannel = None,
    unetpp_inference: _PredictUnetppInference = INFER.unetpp_inference,
    prune_depth: _PredictPruneDepth = INFER.unetpp_prune_depth,
) -> None:
    """Sliding-window prediction, fold and configuration ensembling, export in the input's geometry."""
    settings = dict(
        step_size=step,
        mirroring=False if no_mirroring else None,
        compile=compile_,
        precision=precision,
        backend=backend,
        export_cache=export_cache,
        reuse_heap=False if no_heap_reuse else None,
        fix_nonfinite=True if fix_nonfinite else None,
        save_uncertainty=True if save_uncertainty else None,
        calibration=False if no_calibration else None,
        unetpp_inference=unetpp_inference,
        unetpp_prune_depth=prune_depth,
    )
    with _progress() as bar:
        written = api.predict_paths(
            paths,
            model=model,
            folds=folds,
            mirror_axes=mirror_axes,
            output_formats=output_format,
            channels=channel,
            settings=settings,
            configs=config or None,
            device=device,
            continue_=continue_,
            overwrite=overwrite,
            save_probabilities=save_probabilities,
            postprocessing=not no_postprocessing,
            progress=_case_progress(bar, "predict"),
            announce=lambda line: out.print(line, markup=False, highlight=False, soft_wrap=True),
        )
    out.print(f"{len(written)} prediction(s) written to {paths[-1]}")


@app.command()
def evaluate(
    reference_dir: Annotated[Path, typer.Argument(help="Folder of reference label maps")],
    prediction_dir: Annotated[Path, typer.Argument(help="Folder of predicted label maps")],
    dataset_json: Annotated[Path, typer.Option("--dataset-json", help="The dataset's dataset.json")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="summary.json path")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", min=1)] = api.DEFAULT_WORKERS,
    tolerance: Annotated[
        float, typer.Option("--tolerance", min=0, help="Tolerance in mm of the normalised surface Dice")
    ] = api.DEFAULT_TOLERANCE_MM,
    overlays: Annotated[
        bool, typer.Option("--overlays", help="A PNG per case: slice with most reference, both contours")
    ] = False,
    images: Annotated[
        Path | None, typer.Option("--images", help="Images (<case>_0000<ending>) under the overlays")
    ] = None,
    missing_as_empty: Annotated[
        bool,
        typer.Option(
            "--missing-as-empty",
            help="Score a reference without a prediction as an empty prediction (default: an error)",
        ),
    ] = False,
    missing_distance: Annotated[
        MissingDistance,
        typer.Option(
            "--missing-distance",
            help="HD/HD95/ASSD of a structure in only one map: skip (left out of the means, counted) or "
            "worst (the image diagonal in mm)",
        ),
    ] = MissingDistance.skip,
    probabilities: Annotated[
        Path | None,
        typer.Option(
            "--probabilities",
            help="Folder of <case>.npz saved probabilities: adds ECE, Brier score and NLL per structure "
            "and a reliability diagram",
        ),
    ] = None,
) -> None:
    """Dice, IoU, precision, recall, specificity, VOE, RVD, HD, HD95, ASSD, NSD per case and label;
    summary.json, per_case.csv, report.png (and overlays)."""
    report = api.evaluate_report(
        reference_dir,
        prediction_dir,
        dataset_json,
        output,
        workers=workers,
        tolerance_mm=tolerance,
        overlays=overlays,
        images_dir=images,
        missing_as_empty=missing_as_empty,
        missing_distance=missing_distance.value,
        probabilities_dir=probabilities,
    )
    _print_summary(report)


@app.command()
def phantom(
    out_dir: Annotated[Path, typer.Argument(help="Empty folder for the synthetic dataset")],
    cases: Annotated[int, typer.Option("--cases", "-n", min=2, max=1000)] = 10,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1)] = 0,
) -> None:
    """Write a deterministic synthetic 2-channel, 2-label 3D dataset in the raw layout."""
    api.make_phantom(out_dir, cases=cases, seed=seed)
    out.print(f"phantom dataset with {cases} cases written to {out_dir}")


@app.command("export-model")
def export_model(
    workdir: Annotated[Path, typer.Argument(help="WORK folder with trained folds")],
    output: Annotated[Path, typer.Argument(help="Bundle to write, e.g. model.zip")],
    config: Annotated[
        list[str] | None,
        typer.Option("--config", "-c", help="Configuration(s) (default: find-best's choice)"),
    ] = None,
    folds: Annotated[
        list[str] | None, typer.Option("--folds", "-f", help="Folds (default: all trained)")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle")] = False,
    no_benchmark: Annotated[
        bool,
        typer.Option(
            "--no-benchmark",
            help="Do not time one prediction of the smallest training case for the model card",
        ),
    ] = False,
) -> None:
    """Write a portable model bundle: plans, dataset.json, weights, postprocessing, model card."""
    manifest = api.export_model(
        workdir, output, config or None, folds or None, overwrite=overwrite, benchmark=not no_benchmark
    )
    size = output.stat().st_size / 2**20
    folds_text = "; ".join(f"{c}: folds {', '.join(f)}" for c, f in manifest["folds"].items())
    out.print(f"wrote {output} ({size:.1f} MiB; {folds_text})", soft_wrap=True)


@app.command("export-network")
def export_network(
    workdir: Annotated[Path, typer.Argument(help="WORK folder with trained folds")],
    config: Annotated[str, typer.Argument(help="Configuration")],
    fold: Annotated[str, typer.Argument(help="Fold 0 .. num_folds-1 (0-4 by default) or 'all'")],
    output: Annotated[Path, typer.Argument(help="File to write (e.g. net.pt or net.onnx)")],
    fmt: Annotated[str, typer.Option("--format", help="torchscript or onnx")] = "torchscript",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file")] = False,
) -> None:
    """Export one fold's network for deployment (patch in, logits out)."""
    path = api.export_network(workdir, config, fold, output, fmt, overwrite=overwrite)
    out.print(f"wrote {path} ({fmt})")


@app.command("import-model")
def import_model(
    bundle: Annotated[Path, typer.Argument(help="Bundle from 'autoseg export-model'")],
    workdir: Annotated[Path, typer.Argument(help="New WORK folder to unpack into")],
) -> None:
    """Unpack a model bundle into a new WORK folder (checked before use)."""
    work = api.import_model(bundle, workdir)
    out.print(api.model_card_summary(work), markup=False, highlight=False, soft_wrap=True)
    out.print(f"model unpacked into {work.root}; predict with: autoseg predict {work.root} INPUT OUTPUT")


@app.command("find-best")
def find_best(
    workdir: Annotated[Path, typer.Argument(help="WORK folder with cross-validated configurations")],
    config: Annotated[
        list[str] | None, typer.Option("--config", "-c", help="Only these configurations (default: all)")
    ] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", min=1)] = api.DEFAULT_WORKERS,
    mirror_tolerance: Annotated[
        float,
        typer.Option(
            "--mirror-tolerance",
            min=0,
            help="Record the cheapest test-time mirroring within this Dice of the best (predict uses it)",
        ),
    ] = api.DEFAULT_MIRROR_TOLERANCE,
    no_mirror_search: Annotated[
        bool, typer.Option("--no-mirror-search", help="Do not measure mirroring (predict keeps its own)")
    ] = False,
) -> None:
    """Choose the best configuration or ensemble by cross-validation Dice, and its postprocessing."""
    result = api.find_best(workdir, config or None, workers, None if no_mirror_search else mirror_tolerance)
    table = Table(title="cross-validation (mean Dice over cases)")
    table.add_column("configuration")
    table.add_column("mean Dice")
    names = sorted({n for s in result["scores"].values() for n in s["dice"]})
    for n in names:
        table.add_column(n)
    for name, s in sorted(result["scores"].items(), key=lambda kv: -(kv[1]["mean_dice"] or -1)):
        mark = " *" if name == result["best"] else ""
        table.add_row(
            name + mark,
            _num(s["mean_dice"]),
            *(_num(s["dice"].get(n)) for n in names),
        )
    _print_table(table)
    for s in result["skipped"]:
        out.print(f"skipped {s['name']}: {s['reason']}")
    pp = result["postprocessing"]
    kept = (["whole foreground"] if pp["keep_largest_foreground"] else []) + list(pp["keep_largest"])
    out.print(
        f"best: {result['best']} (mean Dice {_num(result['mean_dice'])}); postprocessing: "
        + (f"largest component of {', '.join(kept)}" if kept else "none")
        + f" → {_num(result['mean_dice_postprocessed'])}",
        soft_wrap=True,
    )
    out.print(api.calibration_line(result["calibration"]), soft_wrap=True)
    out.print(f"predict with: {result['predict']}", soft_wrap=True)


@app.command()
def variant(
    workdir: Annotated[Path, typer.Argument(help="WORK folder made by 'autoseg plan'")],
    source: Annotated[str, typer.Argument(help="Configuration to copy, e.g. 3d_budget")],
    name: Annotated[str, typer.Argument(help="Name of the new configuration, e.g. 3d_budget_tversky")],
    loss: _TrainLoss = None,
    optimizer: _TrainOptimizer = None,
    schedule: _TrainSchedule = None,
    warmup_fraction: _TrainWarmup = None,
    initial_lr: Annotated[float | None, typer.Option(help="Initial learning rate")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay")] = None,
) -> None:
    """Add a recipe variant: SOURCE's data, network, patch and budget, trained with another loss, optimizer or
    schedule, under NAME; train, find-best and compare take it like any configuration (docs/training.md)."""
    recipe = dict(
        loss=loss,
        optimizer=optimizer,
        schedule=schedule,
        warmup_fraction=warmup_fraction,
        initial_lr=initial_lr,
        weight_decay=weight_decay,
    )
    plans = api.make_variant(workdir, source, name, **recipe)
    given = plans.configuration(name).recipe
    out.print(
        f"configuration {name}: {source} trained with "
        + ", ".join(f"{k} = {v}" for k, v in given.items())
        + f"; train it with 'autoseg train {workdir} {name} FOLD'",
        soft_wrap=True,
        markup=False,
    )


@app.command()
def compare(
    workdir: Annotated[Path, typer.Argument(help="WORK folder with trained configurations")],
    folds: Annotated[
        str | None,
        typer.Option(
            "--folds",
            help="compare on these folds only, e.g. 0 or 0,1 (when not every fold is trained); "
            "writes WORK/compare/folds_0/",
        ),
    ] = None,
) -> None:
    """Every trained configuration side by side: cost, cross-validation Dice / HD95 / NSD per structure, and a
    paired Wilcoxon test of each against the best; writes WORK/compare/compare.md, .csv and .png."""
    result = api.compare(workdir, folds=folds)
    for title, columns, rows in api.compare_tables(result):
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)  # no column rules: fits 80 columns
        for col in columns:
            table.add_column(col, no_wrap=True)
        for row in rows:
            table.add_row(*row)
        _print_table(table)
    for r in result.rows:
        if not r.complete:
            out.print(f"left out of the tests: {r.name}: {r.problem}", soft_wrap=True)
    best = result.row(result.best) if result.best else None
    out.print(
        f"best: {best.name} (mean Dice {best.mean_dice:.4f})"
        if best
        else "best: none (no configuration has every "
        + ("compared " if folds else "")
        + "fold validated"
        + ("" if folds else "; --folds compares on the folds that are")
        + ")"
    )
    out.print(f"written: {', '.join(str(p) for p in result.files.values())}", soft_wrap=True)


def _print_table(table: Table) -> None:
    """``table`` on stdout. Redirected to a file or a pipe (a log), stdout has no width, so the table gets
    the width it needs rather than rich's default 80 columns, which cut configuration names to "3d_bud…";
    in a terminal it fits the terminal."""
    if out.is_terminal:
        out.print(table)
        return
    natural = Measurement.get(out, out.options.update(width=10_000), table).maximum
    Console(file=out.file, width=max(out.width, natural)).print(table)  # print(width=) caps at out.width


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _print_summary(report) -> None:
    """An :class:`autoseg.api.SummaryReport`: a table of the mean metrics per label, then its lines."""
    table = Table(title="mean over cases")
    for col in report.columns:
        table.add_column(col)
    for row in report.rows:
        table.add_row(*row)
    _print_table(table)
    if report.cases is not None:
        out.print(report.cases, soft_wrap=True)
    out.print(f"summary: {report.path}", soft_wrap=True)
    if report.mean_dice is not None:
        out.print(f"mean Dice {report.mean_dice:.4f}")


class _ConsoleHandler(logging.Handler):
    """autoseg's log records as one line each on stderr: ``note:`` for info, ``warning:`` above."""

    def emit(self, record: logging.LogRecord) -> None:
        tag = "[yellow]warning:[/]" if record.levelno >= logging.WARNING else "[dim]note:[/]"
        err.print(f"{tag} {escape(record.getMessage())}", highlight=False, soft_wrap=True)


def _setup_logging() -> None:
    logger = logging.getLogger("autoseg")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: worker pools are shut down, temp files removed


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2 (usage errors too); Ctrl-C exits 130, SIGTERM 143."""
    _setup_logging()
    if argv is None:  # the real command line (not a test calling main): SIGTERM unwinds cleanly
        signal.signal(signal.SIGTERM, _terminate)
    from typer._click.exceptions import NoArgsIsHelpError, UsageError

    try:
        code = app(args=argv, standalone_mode=False)  # returns the exit code of --help and the like
    except NoArgsIsHelpError as exc:  # a bare command: its help, as typer shows it
        from typer import rich_utils

        rich_utils.rich_format_error(exc)
        return exc.exit_code
    except UsageError as exc:  # a bad option or argument: one line too, like every other refusal
        err.print(f"[bold red]error:[/] {escape(exc.format_message())}", highlight=False, soft_wrap=True)
        return 2
    except api.AutosegError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
