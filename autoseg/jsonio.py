"""Atomic JSON and numpy writes: temporary name in the target folder (:mod:`autoseg.atomic`), then ``os.replace``."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.atomic import temp_path_for  # also imported from here by other modules
from autoseg.errors import AutosegError

_tmp_in = temp_path_for


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: readers never see half a file."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(exc, path)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (NaN is refused: it is not JSON)."""
    return write_text(path, json.dumps(obj, indent=2, default=_default, allow_nan=False) + "\n")


MAX_JSON_BYTES = 256 * 1024**2
"""The largest JSON file autoseg reads (256 MiB). Its own files are far smaller (a fingerprint of 100,000
cases is about 60 MB); decoding takes several times the file's size in memory, so a larger file is refused."""


class JSONFileError(AutosegError, ValueError):
    """A JSON file autoseg reads is unusable: not UTF-8, too large, nested too deeply, holds NaN/Infinity or
    is not the kind of value expected. A ``ValueError`` too, so callers that already treat undecodable JSON as
    "invalid" (or recompute a cache) keep doing so; the message names the file."""


class DiskFullError(AutosegError):
    """A write failed because the disk (or the user's quota) is full; the message names the file (``path``)."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = path

    def __reduce__(self):  # keeps ``path`` across a process pool
        return (type(self), (str(self), self.path))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """An object's keys must differ: with ``{"a": 1, "a": 2}`` json keeps the last silently."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup!r} appears twice in one object")
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (write numbers, or null)")


def read_json(path: str | Path, expect: type | None = None) -> Any:
    """Decode the JSON file ``path``. Malformed JSON raises ``json.JSONDecodeError`` (a ``ValueError``, as
    ``json.loads`` does); the rest raises :class:`JSONFileError` naming the file: a file over
    :data:`MAX_JSON_BYTES`, a file that cannot be read, text that is not UTF-8, nesting too deep for
    Python's parser (RecursionError), the non-standard literals ``NaN``, ``Infinity`` and ``-Infinity``, a key
    given twice in one object, and, with ``expect`` (``dict`` or ``list``), a top-level value of another
    kind."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise JSONFileError(
            f"{path}: {_size(size)} is too large for a JSON file autoseg reads (at most {_size(MAX_JSON_BYTES)})"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is harmless
    except UnicodeDecodeError as exc:
        raise JSONFileError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise JSONFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise JSONFileError(
            f"{path}: JSON nested too deeply to read (arrays/objects within each other)"
        ) from None
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # from _reject_constant or _unique_keys
        raise JSONFileError(f"{path}: {exc}") from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "an object {...}", list: "a list [...]"}.get(expect, expect.__name__)
        raise JSONFileError(f"{path}: expected {kind} at the top level, got {_json_kind(value)}")
    return value


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1024**2 else f"{n / 1024**2:.0f} MiB"


def _json_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def raise_if_disk_full(exc: BaseException, path: str | Path, what: str = "") -> None:
    """Turn an ``ENOSPC``/``EDQUOT`` ``OSError`` into :class:`DiskFullError` naming ``path``."""
    if isinstance(exc, OSError) and _disk_full(exc):
        free = _free_bytes(Path(path).parent)
        raise DiskFullError(
            f"{path}: no space left on the disk while writing{' ' + what if what else ''} "
            f"({free / 1e9:.2f} GB free now)",
            path,
        ) from None


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    """``np.save`` atomically (no pickle)."""
    path = Path(path)
    tmp = _tmp_in(path, ".tmp.npy")
    try:
        np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(exc, path)
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
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(exc, path)
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
