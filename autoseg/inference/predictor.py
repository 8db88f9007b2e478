"""Predictor: load plans and fold checkpoints from WORK, predict cases, ensemble folds and configurations.

Folds of one configuration are ensembled by averaging probabilities on its preprocessed grid; configurations
(``predict -c 2d -c 3d_fullres``) by averaging in the original image grid. :func:`predict_cases` runs
reading, inference and writing in overlapping stages.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from autoseg.atomic import check_name_fits, check_output_folder, remove_stale_temporaries, under
from autoseg.checkpoint_io import check_compatible, check_finite, check_weights, load_checkpoint
from autoseg.errors import AutosegError, CheckpointError, DatasetError
from autoseg.inference.backends import OnnxRunner, check_backend
from autoseg.inference.cascade import append_previous_stage, next_stage_segmentation
from autoseg.inference.export import (
    SlabSegmenter,
    map_to_original,
    probabilities_to_labels,
    probabilities_to_original,
    probabilities_to_segmentation,
    write_segmentation,
)
from autoseg.inference.runner import TileRunner, autocast_dtype
from autoseg.inference.sliding_window import predict_sliding_window, probability_slabs
from autoseg.inference.uncertainty import (
    UncertaintyTable,
    finish_probabilities,
    map_path,
    save_maps,
    structure_rows,
)
from autoseg.io.dataset import Case
from autoseg.io.volume import data_file_names, file_ending, read_channels
from autoseg.jsonio import save_npz
from autoseg.layout import WorkDir
from autoseg.networks import build_network
from autoseg.planning.plans import Plans
from autoseg.preprocessing.pipeline import (
    CaseProperties,
    preprocess_image,
    spacing_outside_training,
)
from autoseg.settings import InferenceSettings

_log = logging.getLogger("autoseg")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; else ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, which must
    be available on this machine (an :class:`AutosegError` naming ``--device`` otherwise)."""
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise AutosegError(f"--device {name!r}: unknown device (use auto, cpu, cuda, cuda:N or mps)")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise AutosegError(f"--device {name}: no CUDA GPU is available to torch")
        if index and int(index) >= torch.cuda.device_count():
            raise AutosegError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
            )
    if kind == "mps" and not _mps_available():
        raise AutosegError(f"--device {name}: Apple MPS is not available to torch on this machine")
    return torch.device(name)


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def topology_key(plans: Plans, config: str) -> dict:
    """What a checkpoint must match: the network topology of ``config`` in ``plans``."""
    return json.loads(json.dumps(asdict(plans.configuration(config).network)))


class Predictor:
    """Predicts with one configuration and one or more folds of a WORK folder."""

    def __init__(
        self,
        work: WorkDir,
        config: str,
        folds: list[int | str],
        device: torch.device,
        settings: InferenceSettings = InferenceSettings(),
        checkpoint_name: str = WorkDir.CHECKPOINT_FINAL,
        plans: Plans | None = None,
        with_previous_stage: bool = True,
    ):
        """Load ``folds`` of ``config``. A cascade configuration also loads the same folds of its previous
        stage (unless ``with_previous_stage`` is False: the caller then supplies its prediction)."""
        self.work = work
        self.plans = plans or Plans.load(work.plans)
        self.config = self.plans.configuration(config)
        self.device = device
        self.settings = settings
        self.in_channels = self.plans.input_channels(config)
        key = topology_key(self.plans, config)
        _check_memory(self.plans, config, device, settings.tiles_per_pass(device.type) * len(folds))
        # one network per fold: a compiled network has its weights frozen in, so folds cannot share one
        self.runners: list[TileRunner] = []
        dtype = autocast_dtype(settings.precision, device)
        for fold in folds:
            path = work.checkpoint(config, fold, checkpoint_name)
            if not path.is_file():
                raise CheckpointError(
                    f"{path}: not found (train it with 'autoseg train {work.root} {config} {fold}')"
                )
            ckpt = load_checkpoint(path)
            check_compatible(ckpt, path, config, key)
            network = build_network(self.config.network, self.in_channels, self.plans.num_outputs)
            check_weights(ckpt, path, network.state_dict())
            check_finite(ckpt, path)
            network.load_state_dict(ckpt["network"])
            set_network_inference(network, settings)
            del ckpt
            self.runners.append(self._runner(network, dtype))
        if not self.runners:
            raise CheckpointError("no folds given to predict with")
        self.previous: Predictor | None = None
        if self.config.previous_stage and with_previous_stage:
            self.previous = Predictor(
                work, self.config.previous_stage, folds, device, settings, checkpoint_name, self.plans
            )

    def _runner(self, network: torch.nn.Module, dtype: torch.dtype | None):
        """The callable ``tiles -> logits`` of one fold: torch (eager or compiled, in ``dtype``), or the
        network exported to the settings' other backend (:mod:`autoseg.inference.backends`, float32)."""
        settings, device = self.settings, self.device
        if settings.backend == "torch":
            amp, heap = dtype is not None, settings.reuse_heap
            return TileRunner(network.to(device), device, settings.compile, amp, heap, dtype)
        check_backend(settings.backend, device)
        if dtype is not None:
            _log.info("--backend %s runs in float32 (not %s)", settings.backend, str(dtype).split(".")[-1])
        tiles = settings.tiles_per_pass(device.type)
        tile = (tiles, self.in_channels, *self.config.patch_size)
        cache = Path(settings.export_cache) if settings.export_cache else None
        description = json.dumps(dataclasses.asdict(self.config.network), sort_keys=True, default=str)
        return OnnxRunner(network, tile, torch.get_num_threads(), settings.backend, cache, description)

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        if not self.settings.mirroring:
            return ()
        return tuple(a for a in self.settings.mirror_axes if a < self.config.dim)

    @property
    def members(self) -> int:
        """Members of this configuration's ensemble: folds × mirror flips."""
        return len(self.runners) * 2 ** len(self.mirror_axes)

    def predict_preprocessed(self, image: np.ndarray, member_entropy: bool = False, background=None):
        """Averaged class probabilities ``(K, ...)`` over folds for a preprocessed image ``(C, ...)``; with
        ``member_entropy`` also the members' mean entropy (see :func:`predict_sliding_window`, as for
        ``background``, which only counts when the ``skip_background_tiles`` setting is on)."""
        return predict_sliding_window(
            self.runners, image, **self._window_args(background), member_entropy=member_entropy
        )

    def probability_slabs(self, image: np.ndarray, member_entropy: bool = False, background=None):
        """:meth:`predict_preprocessed` slab by slab along axis 0 (see :func:`probability_slabs`)."""
        args = self._window_args(background)
        return probability_slabs(self.runners, image, **args, member_entropy=member_entropy)

    def _window_args(self, background=None) -> dict:
        return dict(
            background=background if self.settings.skip_background_tiles else None,
            patch_size=self.config.patch_size,
            num_classes=self.plans.num_outputs,
            device=self.device,
            step_size=self.settings.step_size,
            mirror_axes=self.mirror_axes,
            tile_batch=self.settings.tiles_per_pass(self.device.type),
            activation="sigmoid" if self.plans.region_based else "softmax",
        )

    def prepare(self, raw: np.ndarray, geom, source, case_id: str, files=()) -> Prepared:
        """Preprocess a case read with :func:`read_channels` for this configuration (and its previous stage);
        ``files`` (one per channel) name the input in errors."""
        image, _, props = preprocess_image(
            raw, geom, source, self.plans, self.config, None, case_id, files=files
        )
        low = None
        if self.previous is not None:
            low, _, _ = preprocess_image(
                raw, geom, source, self.plans, self.previous.config, None, case_id, files=files
            )
        return Prepared(image, props, low)

    def infer(self, prepared: Prepared, member_entropy: bool = False):
        """Probabilities on this configuration's grid (a cascade first runs its previous stage); with
        ``member_entropy`` a pair: they and the members' mean entropy on the same grid."""
        image = self._network_input(prepared)
        return self.predict_preprocessed(image, member_entropy, prepared.props.background)

    def segment_by_slabs(
        self, prepared: Prepared, uncertainty: bool = False, member_entropy: bool = False, calibrate=None
    ) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """The label map in the file's array order, exported slab by slab as the sliding window finishes
        them (:class:`SlabSegmenter`): memory independent of the number of classes. With ``uncertainty``
        also the uncertainty maps on the network's grid (one scalar volume each, made slab by slab by
        :func:`finish_probabilities`; ``member_entropy``: with the members' disagreement; ``calibrate``: the
        temperature the maps see), else None."""
        image = self._network_input(prepared)
        segmenter = SlabSegmenter(prepared.props, self.plans, image.shape[1:])
        maps: dict[str, np.ndarray] = {}
        for a, b, slab, *ent in self.probability_slabs(image, member_entropy, prepared.props.background):
            slab_maps = None
            if uncertainty:
                _, slab_maps = finish_probabilities(
                    slab, ent[0] if ent else None, self.plans.region_based, uncertainty, calibrate
                )
            segmenter.add(a, b, slab)
            for name, values in (slab_maps or {}).items():
                maps.setdefault(name, np.empty(image.shape[1:], dtype=np.float32))[a:b] = values
        return segmenter.result(), (maps if uncertainty else None)

    def _network_input(self, prepared: Prepared) -> np.ndarray:
        image = prepared.image
        if self.previous is not None:
            low_probs = self.previous.predict_preprocessed(prepared.low)
            prev = next_stage_segmentation(
                low_probs, self.previous.config.spacing, prepared.props.shape_resampled, self.plans
            )
            image = append_previous_stage(image, prev, self.plans.num_classes)
        return image


def set_network_inference(network: torch.nn.Module, settings: InferenceSettings) -> None:
    """The eval-mode answer of a network with several (UNet++: ``set_inference``), from ``settings``' UNet++
    fields ("auto" has been resolved by the caller, else it means accurate); other networks are left alone.
    A prune depth the network does not have is refused in one line naming the option."""
    if not hasattr(network, "set_inference"):
        return
    mode = "accurate" if settings.unetpp_inference == "auto" else settings.unetpp_inference
    try:
        network.set_inference(mode, settings.unetpp_prune_depth or None)
    except ValueError as exc:
        raise AutosegError(
            f"--unetpp-inference {mode} --prune-depth {settings.unetpp_prune_depth}: {exc}"
        ) from None


def _check_memory(plans: Plans, config: str, device: torch.device, tiles: int) -> None:
    """Refuse, before allocating, a configuration whose forward pass cannot fit in the device's memory (e.g. a
    plans.json that was edited, or came in a model bundle, with a huge patch)."""
    from autoseg.planning.memory import estimate_inference_bytes
    from autoseg.preprocessing.pipeline import memory_bytes

    c = plans.configuration(config)
    need = estimate_inference_bytes(
        c.patch_size,
        tiles,
        c.network.features_per_stage,
        plans.input_channels(config),
        plans.num_outputs,
        plans.parameter_count(config),
    )
    have = memory_bytes(device)
    if have and need > have:
        where = f"{plans.source}: " if plans.source is not None else ""
        raise CheckpointError(
            f"{where}configuration '{config}' (patch {c.patch_size}, {plans.num_outputs} outputs) needs at least "
            f"{need / 2**30:.1f} GiB to predict, more than the {have / 2**30:.1f} GiB of {device.type}"
        )


@dataclass
class Prepared:
    """One case preprocessed for one configuration: its image, properties, and the previous stage's input."""

    image: np.ndarray
    props: CaseProperties
    low: np.ndarray | None = None


def predict_cases(
    predictors: list[Predictor],
    cases: list[Case],
    targets: list[Path],
    postprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    save_probabilities: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    training_spacings: np.ndarray | None = None,
    write: Callable[[np.ndarray, CaseProperties, Path], Path] | None = None,
    calibrate: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[Path]:
    """Predict ``cases`` into ``targets`` with one or more configurations (their probabilities averaged).

    Three stages overlap: a reader thread reads and preprocesses the next case, the main thread runs the
    networks, a writer thread exports and writes the previous case, so the device does not wait on disk. One
    configuration is exported straight from its grid (channel by channel); several are averaged in the
    file's own grid. ``save_probabilities`` also writes ``<case>.npz`` (``probabilities``: float16
    ``(K, *file shape)``). The settings' ``save_uncertainty`` also writes ``<case>_uncertainty.npz`` and
    ``uncertainty.csv`` (:mod:`autoseg.inference.uncertainty`). ``postprocess`` is applied to each label map
    before writing. A case whose spacing is far outside ``training_spacings`` (the fingerprint's, when known)
    gets a warning. ``write(seg, props, target)`` replaces :func:`write_segmentation` (DICOM outputs:
    :mod:`autoseg.inference.dicom_export`). ``calibrate`` (:func:`autoseg.inference.calibrate.calibrator`)
    turns the ensemble mean into the probabilities that are saved and that the uncertainty maps are computed
    from; label maps come from the uncalibrated probabilities, which a temperature does not reorder.
    """
    read = partial(_read_case, predictors, training_spacings)
    job = _CaseOutputs(predictors, postprocess, save_probabilities, write, targets, calibrate)
    written: list[Path] = []
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        pending_read = reader.submit(read, cases[0]) if cases else None
        pending_write: Future | None = None
        for i, target in enumerate(targets):
            prepared = pending_read.result()
            pending_read = reader.submit(read, cases[i + 1]) if i + 1 < len(cases) else None
            result = job.infer(prepared)
            if pending_write is not None:  # at most one case waits to be written
                written.append(pending_write.result())
                if progress:
                    progress(cases[i - 1].case_id, i, len(cases))
            pending_write = writer.submit(job.export, result, prepared, target, cases[i].case_id)
            del result, prepared
        if pending_write is not None:
            written.append(pending_write.result())
            if progress:
                progress(cases[-1].case_id, len(cases), len(cases))
    return written


def _read_case(predictors: list[Predictor], training_spacings, case: Case) -> list[Prepared]:
    """Read ``case`` (image files or a DICOM series) and preprocess it for every predictor."""
    plans = predictors[0].plans
    if getattr(case, "series", None):  # DICOM series (autoseg.io.dicom.DicomCase)
        from autoseg.io.dicom import read_dicom_channels

        raw, geom, source = read_dicom_channels(case, plans.orientation)
    else:
        fix = predictors[0].settings.fix_nonfinite
        raw, geom, source = read_channels(case.images, plans.orientation, case.four_d, fix_nonfinite=fix)
    if training_spacings is not None:
        why = spacing_outside_training(geom.spacing_mm, training_spacings)
        if why:
            _log.warning("%s: %s", case.images[0], why)
    return [p.prepare(raw, geom, source, case.case_id, case.images) for p in predictors]


@dataclass
class _Sliced:
    """A case exported slab by slab: its label map and uncertainty maps (network grid) or None."""

    seg: np.ndarray
    maps: dict[str, np.ndarray] | None


class _CaseOutputs:
    """The inference and export stages of :func:`predict_cases`: what is computed and written per case."""

    def __init__(self, predictors, postprocess, save_probabilities, write, targets, calibrate=None):
        self.predictors, self.plans = predictors, predictors[0].plans
        self.calibrate = calibrate
        self.postprocess, self.save_probabilities = postprocess, save_probabilities
        self.write = write or write_segmentation
        self.slab_bytes = predictors[0].settings.slab_export_gb * 1e9
        self.uncertainty = predictors[0].settings.save_uncertainty
        # the members' disagreement needs two members at least (folds × flips, over the configurations)
        self.member_entropy = self.uncertainty and sum(p.members for p in predictors) >= 2
        self.table = UncertaintyTable(Path(targets[0]).parent) if self.uncertainty and targets else None
        self.structures = _structures(self.plans) if self.uncertainty else {}

    def by_slabs(self, prepared: list[Prepared]) -> bool:
        """One configuration, no saved probabilities, and probabilities too large to hold at once."""
        if len(self.predictors) != 1 or self.save_probabilities:
            return False
        return self.plans.num_outputs * math.prod(prepared[0].props.shape_resampled) * 4 > self.slab_bytes

    def infer(self, prepared: list[Prepared]):
        """A :class:`_Sliced` case, or per configuration its probabilities and members' entropy (or None)."""
        if self.by_slabs(prepared):
            return _Sliced(
                *self.predictors[0].segment_by_slabs(
                    prepared[0], self.uncertainty, self.member_entropy, self.calibrate
                )
            )
        out = []
        for p, r in zip(self.predictors, prepared):
            res = p.infer(r, self.member_entropy)
            out.append(res if self.member_entropy else (res, None))
        return out

    def export(self, result, prepared: list[Prepared], target: Path, case_id: str) -> Path:
        """Write one case: its uncertainty maps and table rows (when asked), then its label file (last: it
        marks the case as done for ``--continue``)."""
        props = prepared[0].props
        if isinstance(result, _Sliced):
            seg, maps = result.seg, result.maps
            maps = maps and {k: map_to_original(v, props, self.plans) for k, v in maps.items()}
        elif len(result) == 1:
            seg, maps = self._export_one(*result[0], props, target)
        else:
            seg, maps = self._export_ensemble(result, prepared, target)
        if self.postprocess is not None:
            seg = self.postprocess(seg)
        if maps is not None:
            geometry = props.source_geometry
            save_maps(map_path(target, case_id), maps, geometry)
            self.table.add(case_id, structure_rows(case_id, seg, maps, self.structures, geometry.spacing_mm))
        return self.write(seg, props, target)

    def _export_one(self, probs, entropy, props, target):
        """One configuration: labels (and maps) straight from its grid."""
        seg = probabilities_to_segmentation(probs, props, self.plans)
        if not (self.save_probabilities or self.uncertainty):
            return seg, None
        final, maps = finish_probabilities(
            probs, entropy, self.plans.region_based, self.uncertainty, self.calibrate
        )
        if self.save_probabilities:
            save_npz(
                _probabilities_path(target), probabilities=probabilities_to_original(final, props, self.plans)
            )
        maps = maps and {k: map_to_original(v, props, self.plans) for k, v in maps.items()}
        return seg, maps

    def _export_ensemble(self, result, prepared, target):
        """Several configurations, averaged in the image grid, one float32 sum at a time (their members'
        entropies too)."""
        plans, n = self.plans, len(result)
        total = entropy = None
        for i, ((probs, ent), r) in enumerate(zip(result, prepared)):
            p = probabilities_to_original(probs, r.props, plans)
            if i == 0:
                total = p.astype(np.float32)
            else:
                total += p
            if ent is not None:
                e = map_to_original(ent, r.props, plans)
                entropy = e if entropy is None else entropy + e
        total /= n
        if entropy is not None:
            entropy /= n
        seg = probabilities_to_labels(total, plans)
        if not (self.save_probabilities or self.uncertainty):
            return seg, None
        total, maps = finish_probabilities(
            total, entropy, plans.region_based, self.uncertainty, self.calibrate
        )
        if self.save_probabilities:
            save_npz(_probabilities_path(target), probabilities=total.astype(np.float16))
        return seg, maps


def _structures(plans: Plans) -> dict[str, tuple[int, ...]]:
    """The structures ``uncertainty.csv`` has rows for: those evaluation scores (labels, then regions)."""
    from autoseg.evaluation.evaluate import structures

    labels = {k: v for k, v in plans.labels.items() if v != plans.ignore_label}
    return structures(labels, plans.regions)


def _probabilities_path(target: Path) -> Path:
    name = target.name[: -len(file_ending(target))] if file_ending(target) else target.stem
    return target.with_name(name + ".npz")


def output_targets(
    cases: list[Case],
    output_dir: Path,
    input_dirs: list[Path],
    continue_: bool,
    overwrite: bool,
    save_probabilities: bool = False,
) -> tuple[list[Case], list[Path]]:
    """Output paths ``<case><input ending>`` of ``cases`` in ``output_dir``; with ``continue_`` the cases already
    written are dropped. Only checks, writes nothing: refuses an output folder that is a file, lies under a
    file or cannot be written; the folder of an input file; one that is, or lies inside, a folder given as
    input (``input_dirs``); an output that would replace an input file, or is a folder; and existing outputs (with their
    data files, ``.npz`` probabilities) unless ``continue_`` or ``overwrite``. A case counts as written when
    its label file is there (a header is renamed after its data file)."""
    output_dir = Path(output_dir)
    check_output_folder(output_dir)
    for d in sorted({f.parent for c in cases for f in c.images}) + list(input_dirs):
        if output_dir.resolve() == Path(d).resolve():
            raise DatasetError(f"{output_dir}: output folder must differ from the input folder")
    for d in input_dirs:
        if under(output_dir, d):
            raise DatasetError(
                f"{output_dir}: output folder lies inside the input folder {d}; choose one outside it"
            )
    inputs = {f.resolve(): f for c in cases for f in c.images}
    targets = [output_dir / f"{c.case_id}{file_ending(c.images[0])}" for c in cases]
    existing = []
    for t in targets:
        written = [t, *(t.with_name(n) for n in data_file_names(t))]
        if save_probabilities:
            written.append(_probabilities_path(t))
        for f in written:
            check_name_fits(f)
            if f.resolve() in inputs:
                raise DatasetError(f"{f}: the output would replace the input {inputs[f.resolve()]}")
            if f.is_dir():
                raise DatasetError(f"{f}: is a folder where predict writes an output file; move it away")
            if os.path.lexists(f):
                existing.append(f)
    if existing and not (continue_ or overwrite):
        raise DatasetError(
            f"{existing[0]}: already exists ({len(existing)} output file(s)); use --continue to skip them or --overwrite"
        )
    if continue_:
        keep = [(c, t) for c, t in zip(cases, targets) if not os.path.lexists(t)]
        return [c for c, _ in keep], [t for _, t in keep]
    return cases, targets


def remove_stale_outputs(targets: list[Path], also: Iterable[str] = ()) -> None:
    """Delete what a killed earlier run left of ``targets`` (and of the files named ``also`` beside them):
    their temporary files (:mod:`autoseg.atomic`'s names, nothing else). Other targets' temporaries are kept:
    another run may be writing them."""
    names = {t.name for t in targets} | {_probabilities_path(t).name for t in targets} | set(also)
    names |= {n for t in targets for n in data_file_names(t)}
    for folder in {t.parent for t in targets}:
        remove_stale_temporaries(folder, names)
