"""Atomic outputs: temporary names that prove autoseg made them, and checks of output paths before writing.

Every file autoseg writes is first written under a temporary name beside its target and then renamed onto it
(``os.replace``), so readers never see half a file. A temporary name is::

    .<target name>.autoseg-tmp-<12 lowercase hex digits><suffix>

where ``<suffix>`` is empty or dot-separated alphanumeric parts (``.tmp``, ``.tmp.nii.gz``, ``.zip``; the ending
tells SimpleITK and numpy the format) or ``.d`` for a private folder (a multi-file format written as a unit).
:func:`temp_path_for` / :func:`temp_dir_for` make such names and :func:`temp_target` recognises them: the one
pair that decides what a cleanup of a killed run's leftovers (:func:`remove_stale_temporaries`) may delete.
Anything else, such as a user's ``.a.nii.gz.my-notes.txt``, is never touched.

:func:`check_output_file` and :func:`check_output_folder` refuse output paths that cannot be written (an
existing folder where a file is expected, a path under a file, an unwritable folder) with one line, before a
command does any work.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path

from autoseg.errors import AutosegError

TEMP_MARKER = "autoseg-tmp"
_TOKEN_HEX_DIGITS = 12
_SUFFIX = r"(?:\.[A-Za-z0-9]+)*"
_TEMP_RE = re.compile(
    rf"^\.(?P<target>.+)\.{TEMP_MARKER}-[0-9a-f]{{{_TOKEN_HEX_DIGITS}}}(?P<suffix>{_SUFFIX})$", re.DOTALL
)
_DIR_SUFFIX = ".d"

# the process umask, read once (os.umask can only be read by setting it)
UMASK = os.umask(0o022)
os.umask(UMASK)


def _temp_name(target: str, suffix: str) -> str:
    if not re.fullmatch(_SUFFIX, suffix):
        suffix = ".tmp"  # e.g. an export named 'net.p t': its suffix is not needed to write it
    return f".{target}.{TEMP_MARKER}-{secrets.token_hex(_TOKEN_HEX_DIGITS // 2)}{suffix}"


def temp_path_for(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A new, empty hidden file beside ``path`` (``.<name>.autoseg-tmp-<token><suffix>``) to write and then
    ``os.replace`` onto ``path``. Created exclusively, with the permissions any new file gets under the umask
    (so outputs stay readable by the user's group). The parent folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / _temp_name(path.name, suffix)
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:  # 2**48 tokens: practically never
            continue
        os.close(fd)
        return tmp


def temp_dir_for(path: str | os.PathLike) -> Path:
    """A new private folder beside ``path`` (``.<name>.autoseg-tmp-<token>.d``) to write a multi-file output
    into under its final names, then move its files out."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / _temp_name(path.name, _DIR_SUFFIX)
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        return tmp


def temp_target(name: str) -> str | None:
    """The target name a temporary name of :func:`temp_path_for` / :func:`temp_dir_for` belongs to, or
    ``None`` when ``name`` is not one (then autoseg did not make it)."""
    m = _TEMP_RE.match(name)
    return m.group("target") if m else None


def remove_stale_temporaries(folder: str | os.PathLike, targets: Iterable[str] | None = None) -> list[Path]:
    """Delete the temporary files and folders a killed run left in ``folder`` (not below it): only names
    :func:`temp_target` recognises, and with ``targets`` only those of these target names (so a second run
    writing other targets into the same folder keeps its writes in flight). Links are never followed or
    removed. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if targets is None else set(targets)
    removed = []
    for f in folder.iterdir():
        target = temp_target(f.name)
        if target is None or (wanted is not None and target not in wanted) or f.is_symlink():
            continue
        if f.is_dir() and f.name.endswith(_DIR_SUFFIX):
            shutil.rmtree(f, ignore_errors=True)
        elif f.is_file():
            f.unlink(missing_ok=True)
        else:
            continue
        removed.append(f)
    return removed


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the current folder for a relative path's root)."""
    p = path
    while not os.path.lexists(p):
        if p.parent == p:
            return p
        p = p.parent
    return p


def _check_place(path: Path, what: str) -> None:
    """``path`` (not existing yet, or existing) can be created: no file among its ancestors, and the folder
    that would hold it (or its nearest existing ancestor) is writable."""
    anchor = _nearest_existing(path.parent)
    if not anchor.is_dir():
        kind = "a broken symbolic link" if anchor.is_symlink() and not anchor.exists() else "a file"
        raise AutosegError(f"{path}: cannot write the {what} here: {anchor} is {kind}, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise AutosegError(f"{path}: cannot write the {what}: {anchor} is not writable")


def check_output_file(path: str | os.PathLike, what: str, overwrite: bool | None = None) -> Path:
    """Refuse ``path`` as an output file (one line naming it): an existing folder, a path under a file, an
    unwritable folder, or (when ``overwrite`` is False) an existing file. ``overwrite=None`` allows
    replacing an existing file."""
    path = Path(path)
    if path.is_dir():
        raise AutosegError(f"{path}: is a folder; give the path of the {what} file to write")
    _check_place(path, what)
    check_name_fits(path)
    if os.path.lexists(path) and overwrite is False:
        raise AutosegError(f"{path}: already exists; use --overwrite to replace it")
    return path


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Refuse ``path`` as an output folder (one line naming it): an existing file, a path under a file, or
    an unwritable place."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        kind = "a broken symbolic link" if path.is_symlink() else "a file"
        raise AutosegError(f"{path}: is {kind}, not a folder; give a folder for the {what}")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise AutosegError(f"{path}: the {what} is not writable")
        return path
    _check_place(path, what)
    return path


TEMP_NAME_EXTRA = len(f"..{TEMP_MARKER}-") + _TOKEN_HEX_DIGITS + len(".tmp.nii.gz")
"""Characters a temporary name adds to its target's name (at most, for autoseg's suffixes)."""


def check_name_fits(path: str | os.PathLike) -> None:
    """Refuse (one line) an output whose temporary name would be too long for its file system."""
    path = Path(path)
    anchor = _nearest_existing(path.parent)
    try:
        limit = os.pathconf(anchor, "PC_NAME_MAX") if anchor.is_dir() else 255
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(path.name)) + TEMP_NAME_EXTRA > limit:
        raise AutosegError(
            f"{path}: file name too long to write safely (at most {limit - TEMP_NAME_EXTRA} bytes here, with "
            "room for the temporary name it is written under first)"
        )


def under(child: str | os.PathLike, parent: str | os.PathLike) -> bool:
    """``child`` is ``parent`` or lies inside it, after resolving links."""
    try:
        Path(child).resolve().relative_to(Path(parent).resolve())
        return True
    except ValueError:
        return False
