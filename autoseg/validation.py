"""The final validation of a trained fold, the stage after training: predict the fold's validation cases with
``checkpoint_final.pt`` and score them.

Writes ``results/<config>/fold_<k>/validation/``: ``<case><ending>`` (the segmentation), ``<case>.npz`` (the
probabilities in the original geometry, which find-best ensembles), ``summary.json``, ``per_case.csv`` and
``report.png``; for a stage that feeds a cascade also ``predicted_next_stage/<config>/<case>.npy``.
"""

from __future__ import annotations

import numpy as np
import torch

from autoseg.errors import AutosegError
from autoseg.evaluation.evaluate import evaluate_folders
from autoseg.inference.cascade import append_previous_stage, next_stage_segmentation
from autoseg.inference.export import (
    probabilities_to_original,
    probabilities_to_segmentation,
    write_segmentation,
)
from autoseg.inference.predictor import Predictor
from autoseg.io.dataset import load_dataset_json
from autoseg.jsonio import save_npy, save_npz
from autoseg.layout import WorkDir
from autoseg.planning.plans import Plans
from autoseg.preprocessing.pipeline import load_case_properties
from autoseg.settings import InferenceSettings
from autoseg.training.run import previous_stage_dir


def check_settings(plans: Plans, config_name: str, inference: InferenceSettings) -> None:
    """Refuse inference settings that the final validation of ``config_name`` cannot use (checked before
    training, so that nothing is trained, or deleted, for a validation that would fail)."""
    config = plans.configuration(config_name)
    if inference.mirroring and not any(a < config.dim for a in inference.mirror_axes):
        raise AutosegError(
            f"mirror_axes {list(inference.mirror_axes)}: configuration '{config_name}' is 2D (patch axes 0 "
            "and 1), so the final validation would mirror nothing; use --no-mirroring for that"
        )


def is_validated(work: WorkDir, config_name: str, fold: int | str) -> bool:
    """Whether the fold's final validation has been written (its ``summary.json`` comes last)."""
    return (work.validation(config_name, fold) / WorkDir.SUMMARY).is_file()


def validate_fold(
    work: WorkDir,
    plans: Plans,
    config_name: str,
    fold: int | str,
    val_ids: list[str],
    device: torch.device,
    inference: InferenceSettings,
) -> dict:
    """Predict the fold's validation cases from their preprocessed arrays with the final checkpoint, export
    them in the original geometry to ``validation/`` and score them against ``WORK/gt_segmentations``."""
    config = plans.configuration(config_name)
    predictor = Predictor(
        work, config_name, [fold], device, inference, plans=plans, with_previous_stage=False
    )
    data_dir = work.preprocessed(config.data_identifier)
    previous_dir = previous_stage_dir(work, config, val_ids)
    # a stage that feeds a cascade also exports its validation predictions onto the cascade's grid
    feeds = [c for c in plans.configurations.values() if c.previous_stage == config_name]
    out = work.validation(config_name, fold)
    for case_id in val_ids:
        image = np.load(data_dir / f"{case_id}.npy")
        props = load_case_properties(data_dir, case_id)
        if previous_dir is not None:
            image = append_previous_stage(image, np.load(previous_dir / f"{case_id}.npy"), plans.num_classes)
        probs = predictor.predict_preprocessed(image)
        # kept for find-best: ensembles of configurations are scored on these, in the original geometry
        save_npz(out / f"{case_id}.npz", probabilities=probabilities_to_original(probs, props, plans))
        write_segmentation(
            probabilities_to_segmentation(probs, props, plans), props, out / f"{case_id}{plans.file_ending}"
        )
        for nxt in feeds:
            target = load_case_properties(work.preprocessed(nxt.data_identifier), case_id).shape_resampled
            seg = next_stage_segmentation(probs, config.spacing, target, plans)
            save_npy(work.next_stage(config_name) / f"{case_id}.npy", seg)
    spec = load_dataset_json(work.dataset_json)
    return evaluate_folders(work.gt_segmentations, out, spec, out / WorkDir.SUMMARY, out / WorkDir.PER_CASE)
