"""Functions stay under about 60 lines; a longer one says why in its docstring (issue 14, item 6).

Every function and method in ``autoseg/`` longer than :data:`MAX_LINES` (from its ``def`` line to its last
line, decorators not counted) must have a docstring containing "Long because", followed by the reason
(e.g. "Long because it is one flat list of checks in the order the user meets them").
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "autoseg"
MAX_LINES = 60
PHRASE = "Long because"


def long_functions(root: Path = ROOT, max_lines: int = MAX_LINES) -> list[tuple[str, int, bool]]:
    """("path:name", lines, docstring says why) for every function of ``root`` longer than ``max_lines``."""
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > max_lines:
                    explained = PHRASE in (ast.get_docstring(node) or "")
                    out.append((f"{path.relative_to(root).as_posix()}:{node.name}", lines, explained))
    return out


def test_long_functions_say_why():
    bad = [f"autoseg/{name} ({n} lines)" for name, n, explained in long_functions() if not explained]
    assert not bad, (
        f"functions over {MAX_LINES} lines: split them into named helpers, or say in the docstring "
        f"'{PHRASE} ...':\n" + "\n".join(bad)
    )


def test_checker_catches_a_long_function(tmp_path):
    """A 61-line function without the phrase is reported; with it, or at 60 lines, it is not."""
    body = "".join(f"    x{i} = {i}\n" for i in range(59))
    (tmp_path / "long.py").write_text(f"def too_long():\n{body}    return 0\n")  # 61 lines
    (tmp_path / "ok.py").write_text(f"def just_fits():\n{body[: body.rindex('    x58')]}    return 0\n")
    (tmp_path / "why.py").write_text(f'def explained():\n    """{PHRASE} it must."""\n{body}    return 0\n')
    found = {name: explained for name, _, explained in long_functions(tmp_path)}
    assert found == {"long.py:too_long": False, "why.py:explained": True}
