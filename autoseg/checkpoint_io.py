"""Checkpoint files (shared by training and inference): torch state dicts plus plain metadata, written atomically, loaded with ``weights_only=True``.

A checkpoint holds ``network`` (state dict), ``optimizer`` (state dict), ``epoch`` (number of finished
epochs), ``config`` and ``topology`` (to refuse a checkpoint from another configuration or architecture),
``rng`` (numpy global state as tensors, torch CPU state, the sampler's generator state as JSON text) and
``best_ema`` (exponential moving average of the validation pseudo-Dice).
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from autoseg.errors import CheckpointError
from autoseg.jsonio import temp_path_for

_REQUIRED_KEYS = ("network", "config", "topology")


def save_checkpoint(path: Path, state: dict) -> Path:
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Load with ``weights_only=True``; ``mmap`` maps the tensors from the file instead of reading them (for
    checks that look at shapes only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it better
            warnings.simplefilter("ignore")
            # only torch's zip format can be mapped; an old-style pickle file is read (and refused) as usual
            mapped = mmap and zipfile.is_zipfile(path)
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mapped)
    except pickle.UnpicklingError:
        # weights_only refuses any pickled object but tensors and plain data, so nothing in it has run
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain data (loaded with "
            "weights_only=True, so none of its code ran); not an autoseg checkpoint"
        ) from None
    except Exception as exc:  # torch raises many types for corrupt/foreign files
        raise CheckpointError(
            f"{path}: not a readable autoseg checkpoint (truncated or not a torch file: {type(exc).__name__})"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path}: not an autoseg checkpoint (a {type(ckpt).__name__}, not a dict with 'network', 'config' "
            "and 'topology')"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: not an autoseg checkpoint (missing {', '.join(repr(k) for k in missing)})"
        )
    return ckpt


def check_compatible(ckpt: dict, path: Path, config: str, topology: dict) -> None:
    """Raise :class:`CheckpointError` if ``ckpt`` was trained for another configuration or network."""
    if ckpt.get("config") != config:
        raise CheckpointError(
            f"{path}: checkpoint is for configuration '{ckpt.get('config')}', not '{config}'"
        )
    try:
        saved = json.loads(ckpt.get("topology", "{}"))
    except (TypeError, ValueError):
        saved = None
    if saved != topology:
        raise CheckpointError(
            f"{path}: checkpoint network does not match the plans (architecture or topology changed)"
        )


def check_weights(ckpt: dict, path: Path, expected: dict[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` unless ``ckpt['network']`` holds exactly the tensors of ``expected`` (a
    network's ``state_dict()``, possibly on the meta device): same names, shapes and dtypes."""
    weights = ckpt.get("network")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: 'network' is not a dict of tensors; not an autoseg checkpoint")
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise CheckpointError(
            f"{path}: network weights do not match the plans ({what}; {len(missing)} missing, {len(extra)} unexpected)"
        )
    for name, want in expected.items():
        got = weights[name]
        if got.layout != torch.strided:
            raise CheckpointError(
                f"{path}: network weight {name!r} is a {got.layout} tensor, not a dense one"
            )
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(
                f"{path}: network weight {name!r} is {_dtype(got)} {list(got.shape)}, but the plans' network "
                f"needs {_dtype(want)} {list(want.shape)}"
            )


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def check_finite(ckpt: dict, path: Path) -> None:
    """Raise :class:`CheckpointError` if a floating-point weight holds NaN or Inf (such a network predicts
    nonsense, or all background, without any other sign)."""
    for name, t in ckpt["network"].items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: network weight {name!r} holds NaN or Inf values")
