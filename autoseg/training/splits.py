"""Seeded k-fold cross-validation split over case ids, stored as ``WORK/splits.json`` (user-editable)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError, PlansError
from autoseg.jsonio import read_json, write_json


def make_splits(case_ids: list[str], num_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    """Shuffle ``case_ids`` with ``seed`` and deal them into ``num_folds`` folds as evenly as possible.

    With fewer cases than folds, folds repeat cases (fold k validates on case k mod n) so every fold exists.
    """
    ids = sorted(case_ids)
    if len(ids) < 2:
        raise PlansError(f"cross-validation needs at least 2 cases, the dataset has {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    if len(ids) >= num_folds:
        chunks = np.array_split(np.arange(len(ids)), num_folds)
    else:
        chunks = [np.array([k % len(ids)]) for k in range(num_folds)]
    out = []
    for chunk in chunks:
        val = sorted(shuffled[i] for i in chunk)
        train = sorted(c for c in ids if c not in val)
        out.append({"train": train, "val": val})
    return out


def load_or_create_splits(
    path: Path, case_ids: list[str], num_folds: int = 5, seed: int = 12345
) -> list[dict]:
    """Read ``splits.json`` if present (checking it names known cases), else create and write it."""
    if path.is_file():
        try:
            splits = read_json(path, expect=list)
        except ValueError as exc:  # JSONFileError names the file itself
            raise PlansError(
                str(exc) if isinstance(exc, AutosegError) else f"{path}: not valid JSON ({exc})"
            ) from None
        known = set(case_ids)
        if not splits or not all(
            isinstance(f, dict)
            and all(isinstance(f.get(key, []), list) for key in ("train", "val"))
            and all(isinstance(c, str) for c in f.get("train", []) + f.get("val", []))
            for f in splits
        ):
            raise PlansError(
                f'{path}: expected a list of folds like {{"train": [...], "val": [...]}} of case ids'
            )
        for k, fold in enumerate(splits):
            unknown = sorted((set(fold.get("train", [])) | set(fold.get("val", []))) - known)
            if unknown or not fold.get("train") or "val" not in fold:
                raise PlansError(
                    f"{path}: fold {k} is invalid (unknown cases {unknown[:3]} or empty train list)"
                )
        return splits
    splits = make_splits(case_ids, num_folds, seed)
    write_json(path, splits)
    return splits


def repeated_split_note(splits: list[dict], fold: int | str) -> str | None:
    """A line saying that ``fold`` validates on exactly the cases of an earlier fold (a dataset with fewer
    cases than folds, see :func:`make_splits`), naming the lowest such fold; None for a fold of its own or
    ``all``."""
    if str(fold) == "all" or not 0 <= int(fold) < len(splits):
        return None
    k = int(fold)
    val = sorted(splits[k]["val"])
    earlier = next((j for j in range(k) if sorted(splits[j]["val"]) == val), None)
    if earlier is None:
        return None
    return (
        f"fold {k} validates on the same case(s) as fold {earlier} ({', '.join(val)}): splits.json has "
        f"{len(splits)} folds for {len({c for f in splits for c in f['val']})} validation cases, so this fold "
        f"trains fold {earlier}'s split again; find-best and compare score each case from fold {earlier}"
    )


def fold_cases(splits: list[dict], fold: int | str, case_ids: list[str]) -> tuple[list[str], list[str]]:
    """(train ids, validation ids) for ``fold``; fold ``all`` trains on every case and validates on none."""
    if str(fold) == "all":
        return sorted(case_ids), []
    k = int(fold)
    if not 0 <= k < len(splits):
        raise PlansError(f"fold {fold} does not exist (splits.json has folds 0..{len(splits) - 1} and 'all')")
    return list(splits[k]["train"]), list(splits[k]["val"])
