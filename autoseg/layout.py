"""WorkDir: the only module that knows the on-disk tree of a WORK folder.

::

    WORK/
      dataset.json            copy of the dataset's dataset.json (what the plans were made for)
      fingerprint.json        dataset fingerprint (autoseg.fingerprint)
      plans.json              plans (autoseg.planning.plans)
      splits.json             5-fold split over case ids (user-editable)
      gt_segmentations/       copies of labelsTr (reference for validation scores)
      preprocessed/<data_id>/ <case>.npy (C,Z,Y,X float32), <case>_seg.npy (Z,Y,X uint8),
                              <case>.json (properties), <case>_fg.npz (foreground locations)
      predicted_next_stage/<config>/<case>.npy   a lowres stage's validation predictions on the fullres grid
      results/<config>/fold_<k>/
          checkpoint_latest.pt, checkpoint_final.pt, log.jsonl, settings.json
          log.jsonl, progress.png, checkpoint_best.pt
          validation/<case><ending>, validation/<case>.npz (probabilities), validation/summary.json
      results/crossval/<config or ensemble__A__B>/   cross-validation predictions, summary.json (find-best)
          postprocessed/                              the chosen one after postprocessing
      inference_instructions.json                     what find-best chose: configs, folds, postprocessing
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkDir:
    root: Path

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
    def inference_instructions(self) -> Path:
        return self.root / "inference_instructions.json"

    def fold_dir(self, config: str, fold: int | str) -> Path:
        name = "fold_all" if str(fold) == "all" else f"fold_{int(fold)}"
        return self.root / "results" / config / name

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
        }
        folders = {"gt_segmentations", "preprocessed", "predicted_next_stage", "results"}
        if not rel.parts:
            return False
        return rel.parts[0] in folders or (len(rel.parts) == 1 and rel.parts[0] in files)
