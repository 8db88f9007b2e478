"""Atomic JSON and numpy writes: temporary name in the target folder, then ``os.replace``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# the process umask, read once (os.umask can only be read by setting it)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def temp_path_for(path: str | Path, suffix: str = ".tmp") -> Path:
    """A new, empty hidden file beside ``path`` (``.<name>.<random><suffix>``) to write and then
    ``os.replace`` onto ``path``. Unlike a bare ``mkstemp`` file (mode 0600) it gets the permissions any new
    file would get under the umask, so outputs stay readable by the user's group."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    return Path(tmp)


_tmp_in = temp_path_for


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: readers never see half a file."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (NaN is refused: it is not JSON)."""
    return write_text(path, json.dumps(obj, indent=2, default=_default, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    """``np.save`` atomically (no pickle)."""
    path = Path(path)
    tmp = _tmp_in(path, ".tmp.npy")
    try:
        np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """``np.savez_compressed`` atomically (no pickle)."""
    path = Path(path)
    tmp = _tmp_in(path, ".tmp.npz")
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
