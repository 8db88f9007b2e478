"""Predictor: load plans and fold checkpoints from WORK, predict cases, ensemble folds, export.

Folds are ensembled by averaging softmax probabilities on the preprocessed grid, before export.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from autoseg.checkpoint_io import check_compatible, load_checkpoint
from autoseg.errors import CheckpointError, DatasetError
from autoseg.inference.cascade import append_previous_stage, next_stage_segmentation
from autoseg.inference.export import probabilities_to_segmentation, write_segmentation
from autoseg.inference.sliding_window import predict_sliding_window
from autoseg.io.dataset import Case, discover_inputs
from autoseg.io.volume import file_ending
from autoseg.layout import WorkDir
from autoseg.networks import build_network
from autoseg.planning.plans import Plans
from autoseg.preprocessing.pipeline import CaseProperties, preprocess_image, read_channels
from autoseg.settings import InferenceSettings


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DatasetError("--device cuda: no CUDA GPU is available to torch")
    return torch.device(name)


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
        checkpoint_name: str = "checkpoint_final.pt",
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
        self.network = build_network(
            self.config.network, self.plans.input_channels(config), self.plans.num_outputs
        )
        self.network.to(device)
        key = topology_key(self.plans, config)
        self.states = []
        for fold in folds:
            path = work.fold_dir(config, fold) / checkpoint_name
            if not path.is_file():
                raise CheckpointError(
                    f"{path}: not found (train it with 'autoseg train {work.root} {config} {fold}')"
                )
            ckpt = load_checkpoint(path)
            check_compatible(ckpt, path, config, key)
            self.states.append(ckpt["network"])
        if not self.states:
            raise CheckpointError("no folds given to predict with")
        self.previous: Predictor | None = None
        if self.config.previous_stage and with_previous_stage:
            self.previous = Predictor(
                work, self.config.previous_stage, folds, device, settings, checkpoint_name, self.plans
            )

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        return tuple(range(self.config.dim)) if self.settings.mirroring else ()

    def predict_preprocessed(self, image: np.ndarray) -> np.ndarray:
        """Averaged class probabilities ``(K, ...)`` over folds for a preprocessed image ``(C, ...)``."""
        total = None
        for state in self.states:
            self.network.load_state_dict(state)
            probs = predict_sliding_window(
                self.network,
                image,
                self.config.patch_size,
                self.plans.num_outputs,
                self.device,
                step_size=self.settings.step_size,
                mirror_axes=self.mirror_axes,
                tile_batch=self.settings.tile_batch,
                amp=self.device.type == "cuda",
                activation="sigmoid" if self.plans.region_based else "softmax",
            )
            total = probs if total is None else total + probs
        return total / len(self.states)

    def segment_preprocessed(self, image: np.ndarray, props: CaseProperties) -> np.ndarray:
        return probabilities_to_segmentation(self.predict_preprocessed(image), props, self.plans)

    def predict_case(self, case: Case) -> tuple[np.ndarray, CaseProperties]:
        raw, geom, source = read_channels(case.images, self.plans.orientation)
        image, _, props = preprocess_image(raw, geom, source, self.plans, self.config, None, case.case_id)
        if self.previous is not None:
            prev_cfg = self.previous.config
            low, _, _ = preprocess_image(raw, geom, source, self.plans, prev_cfg, None, case.case_id)
            low_probs = self.previous.predict_preprocessed(low)
            prev = next_stage_segmentation(low_probs, prev_cfg.spacing, props.shape_resampled, self.plans)
            image = append_previous_stage(image, prev, self.plans.num_classes)
        return self.segment_preprocessed(image, props), props

    def predict_folder(
        self,
        input_path: Path,
        output_dir: Path,
        continue_: bool = False,
        overwrite: bool = False,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> list[Path]:
        """Predict every case of ``input_path`` into ``output_dir`` as ``<case><input ending>``.

        ``progress(case_id, done, total)`` is called after each case (written or skipped)."""
        cases = discover_inputs(input_path, len(self.plans.channel_names))
        output_dir = Path(output_dir)
        in_dir = Path(input_path) if Path(input_path).is_dir() else Path(input_path).parent
        if output_dir.resolve() == in_dir.resolve():
            raise DatasetError(f"{output_dir}: output folder must differ from the input folder")
        targets = [output_dir / f"{c.case_id}{file_ending(c.images[0])}" for c in cases]
        existing = [t for t in targets if t.exists()]
        if existing and not (continue_ or overwrite):
            raise DatasetError(
                f"{existing[0]}: already exists ({len(existing)} output(s)); use --continue to skip them or --overwrite"
            )
        written = []
        for i, (case, target) in enumerate(zip(cases, targets)):
            if not (continue_ and target.exists()):
                seg, props = self.predict_case(case)
                written.append(write_segmentation(seg, props, target))
            if progress:
                progress(case.case_id, i + 1, len(cases))
        return written
