"""Put a folder back as a refused command found it.

A command that can discover a problem only while it writes (a case whose intensities normalise to NaN, a
full disk) must still leave nothing behind: :class:`Undo` notes what existed under a folder before the command
wrote anything, keeps the files and folders it replaces under hidden names, and on :meth:`rollback` removes
everything new and puts the kept ones back. :meth:`commit` forgets the kept copies. A refusal
(:class:`autoseg.errors.AutosegError`) rolls back; an interruption (Ctrl-C, SIGTERM) commits, so that work
already done is resumed by the next run.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

# the names :meth:`Undo._hidden` gives (``.<name>.<8 hex digits>.undo``): only these are ever removed as stale
_UNDO_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.undo$")


class Undo:
    """What existed under ``root`` (and which of its missing ancestors this command will create)."""

    def __init__(self, root: Path, scope: tuple[str, ...] | None = None):
        """``scope``: the names directly under ``root`` that the command writes (with their hidden temporary
        names ``.<name>.*``); rollback removes nothing else, so another command writing elsewhere under
        ``root`` meanwhile (e.g. training into ``results/``) is left alone. None: everything under ``root``."""
        self.root = Path(root).absolute()
        self.scope = scope
        top = self.root
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        # the highest folder this command creates, if it creates ``root``: removed whole on rollback
        self.created = None if self.root.exists() else top
        self.before: set[Path] = set()
        if self.created is None and self.root.is_dir():
            self.before = {p.relative_to(self.root) for p in self.root.rglob("*")}
        self.kept: list[tuple[Path, Path]] = []  # (original, hidden copy or moved-aside folder)

    def _hidden(self, path: Path) -> Path:
        return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.undo")

    def keep(self, path: Path) -> None:
        """Before ``path`` (a file) is replaced: keep a copy of it (with its mtime). A copy, not a hard link:
        a writer that rewrites the file in place would change a link's content too."""
        path = Path(path)
        if self.created is not None or not path.is_file() or any(p == path for p, _ in self.kept):
            return
        hidden = self._hidden(path)
        shutil.copy2(path, hidden)
        self.kept.append((path, hidden))

    def move_aside(self, path: Path) -> None:
        """Instead of deleting the folder ``path``: rename it to a hidden name (deleted on commit)."""
        path = Path(path)
        if not path.is_dir():
            return
        hidden = self._hidden(path)
        os.replace(path, hidden)
        self.kept.append((path, hidden))

    def _in_scope(self, path: Path) -> bool:
        if self.scope is None:
            return True
        top = path.relative_to(self.root).parts[0]
        return top in self.scope or any(top.startswith(f".{name}.") for name in self.scope)

    def commit(self) -> None:
        """Forget the kept copies, and any a killed run (SIGKILL, power loss) left behind in scope."""
        stale = [hidden for _, hidden in self.kept]
        if self.scope is not None and self.root.is_dir():
            folders = [self.root] + [self.root / n for n in self.scope if (self.root / n).is_dir()]
            for folder in folders:
                stale += [p for p in folder.iterdir() if _UNDO_NAME.match(p.name) and self._in_scope(p)]
        for hidden in stale:
            if hidden.is_dir() and not hidden.is_symlink():
                shutil.rmtree(hidden, ignore_errors=True)
            else:
                hidden.unlink(missing_ok=True)
        self.kept = []

    def rollback(self) -> None:
        """Remove what is new under ``root`` and put back what was kept (best effort: never raises)."""
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        kept = {h for _, h in self.kept}
        new = [
            p
            for p in self.root.rglob("*")
            if p.relative_to(self.root) not in self.before
            and self._in_scope(p)
            and p not in kept
            and not any(k in p.parents for k in kept)
        ]
        for p in sorted(new, key=lambda q: len(q.parts), reverse=True):
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            except OSError:
                pass
        for original, hidden in reversed(self.kept):
            try:
                if original.is_dir() and not original.is_symlink():
                    shutil.rmtree(original, ignore_errors=True)
                os.replace(hidden, original)
            except OSError:
                pass
        self.kept = []
