"""WorkDir: the only module that knows the on-disk tree of a WORK folder.

::

    WORK/
      dataset.json            copy of the dataset's dataset.json (what the plans were made for)
      fingerprint.json        dataset fingerprint (autoseg.fingerprint)
      plans.json              plans (autoseg.planning.plans)
      splits.json             num_folds-fold split over case ids (user-editable; folds 0 .. num_folds-1)
      gt_segmentations/       copies of labelsTr (reference for validation scores)
      preprocessed/<data_id>/ <case>.npy (C,Z,Y,X float32), <case>_seg.npy (Z,Y,X uint8),
                              <case>.json (properties), <case>_fg.npz (foreground locations)
                              distance_maps/<case>.npy, <case>.json  signed distance maps (boundary loss)
      predicted_next_stage/<config>/<case>.npy   a lowres stage's validation predictions on the fullres grid
      results/<config>/fold_<k>/
          checkpoint_latest.pt, checkpoint_final.pt, log.jsonl, settings.json
          log.jsonl, progress.png, checkpoint_best.pt
          validation/<case><ending>, validation/<case>.npz (probabilities), validation/summary.json
      results/crossval/<config or ensemble__A__B>/   cross-validation predictions, summary.json (find-best)
          postprocessed/                              the chosen one after postprocessing
      inference_instructions.json                     what find-best chose: configs, folds, postprocessing
      compare/compare.md, compare.csv, compare.png    every trained configuration side by side (autoseg compare)
      model_card.json, MODEL_CARD.md                  only in a WORK imported from a bundle (autoseg.model_card)

Every name above is spelled here only: the file names are class attributes of :class:`WorkDir`
(``WorkDir.CHECKPOINT_FINAL`` ...), the paths its methods. Folds are ``0 .. num_folds - 1`` (``num_folds``
from the training settings, at most :data:`MAX_FOLDS`) or ``all`` (every case, no validation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MAX_FOLDS = 5
"""The most cross-validation folds (``TrainSettings.num_folds`` is checked against it); trained folds are
looked for among ``0 .. MAX_FOLDS - 1``."""


def fold_names(num_folds: int = MAX_FOLDS) -> list[str]:
    """The cross-validation folds ``"0" .. str(num_folds - 1)``."""
    return [str(k) for k in range(num_folds)]


def fold_range(num_folds: int = MAX_FOLDS) -> str:
    """``"0-4"`` for five folds: the folds as an error message names them."""
    return f"0-{num_folds - 1}"


@dataclass(frozen=True)
class WorkDir:
    root: Path

    # Files of a fold folder (results/<config>/fold_<k>/) and of a folder of scored predictions.
    CHECKPOINT_LATEST = "checkpoint_latest.pt"  # resumable (optimizer and scaler state), every epoch
    CHECKPOINT_BEST = "checkpoint_best.pt"  # best pseudo-Dice EMA so far, weights only
    CHECKPOINT_FINAL = "checkpoint_final.pt"  # after the last epoch: what predict and export use
    FOLD_SETTINGS = "settings.json"
    LOG = "log.jsonl"
    PROGRESS = "progress.png"
    VALIDATION = "validation"
    SUMMARY = "summary.json"  # of validation/, of a crossval/ folder and of its postprocessed/
    PER_CASE = "per_case.csv"
    REPORT = "report.png"
    # The model card a bundle carries (written by export-model, unpacked by import-model).
    MODEL_CARD_JSON = "model_card.json"
    MODEL_CARD_MD = "MODEL_CARD.md"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    @property
    def fingerprint(self) -> Path:
        return self.root / "fingerprint.json"

    @property
    def plans(self) -> Path:
        return self.root / "plans.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def gt_segmentations(self) -> Path:
        """Copies of the dataset's label files (original geometry), the reference for validation."""
        return self.root / "gt_segmentations"

    def next_stage(self, config: str) -> Path:
        """Cross-validation predictions of ``config`` on the full-resolution grid (inputs of a cascade)."""
        return self.root / "predicted_next_stage" / config

    def preprocessed(self, data_identifier: str) -> Path:
        return self.root / "preprocessed" / data_identifier

    def crossval(self, name: str) -> Path:
        """Cross-validation predictions of a configuration or an ensemble (written by find-best)."""
        return self.root / "results" / "crossval" / name

    @property
    def compare_dir(self) -> Path:
        """``autoseg compare``'s tables and figure (:mod:`autoseg.compare`)."""
        return self.root / "compare"

    @property
    def inference_instructions(self) -> Path:
        return self.root / "inference_instructions.json"

    @property
    def model_card(self) -> Path:
        """``model_card.json`` of a WORK imported from a bundle (see :mod:`autoseg.model_card`)."""
        return self.root / self.MODEL_CARD_JSON

    def fold_dir(self, config: str, fold: int | str) -> Path:
        name = "fold_all" if str(fold) == "all" else f"fold_{int(fold)}"
        return self.root / "results" / config / name

    def checkpoint(self, config: str, fold: int | str, name: str = CHECKPOINT_FINAL) -> Path:
        return self.fold_dir(config, fold) / name

    def validation(self, config: str, fold: int | str) -> Path:
        """The fold's validation cases predicted by its final network, and their scores."""
        return self.fold_dir(config, fold) / self.VALIDATION

    def trained_folds(self, config: str) -> list[int | str]:
        """The folds of ``config`` with a final checkpoint, in order: ``0 .. MAX_FOLDS - 1``, or ``["all"]``
        when none of those is trained but ``fold_all`` is (what predict, find-best and export-model use)."""
        out: list[int | str] = [k for k in range(MAX_FOLDS) if self.checkpoint(config, k).is_file()]
        if not out and self.checkpoint(config, "all").is_file():
            out.append("all")
        return out

    def owns(self, path: Path) -> bool:
        """``path`` (after resolving links) is one of WORK's own files or lies in one of its folders, which
        autoseg alone writes: never an output of export or predict."""
        try:
            rel = Path(path).resolve().relative_to(self.root.resolve())
        except ValueError:
            return False
        files = {
            "dataset.json",
            "fingerprint.json",
            "plans.json",
            "splits.json",
            "inference_instructions.json",
            self.MODEL_CARD_JSON,
            self.MODEL_CARD_MD,
        }
        folders = {"gt_segmentations", "preprocessed", "predicted_next_stage", "results", "compare"}
        if not rel.parts:
            return False
        return rel.parts[0] in folders or (len(rel.parts) == 1 and rel.parts[0] in files)
