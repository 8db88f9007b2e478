"""The import graph of ``autoseg`` runs one way: from the CLI down to the bottom-layer artifacts (issue 14).

:data:`LAYERS` is the one declaration of the layer order, top first. A module may import modules of a LOWER
layer, and modules of its own group (the same package, e.g. ``autoseg.training.loop`` ->
``autoseg.training.sampling``), never a module of a higher layer or of another group of its own layer. The
graph between modules must have no cycle. Every ``import`` counts, including lazy imports inside functions and
``TYPE_CHECKING`` blocks: a lazy import is still a dependency, only a hidden one.

Where the shared typed artifacts live: ``autoseg/planning/plans.py`` (the plans dataclasses, including
:class:`ChannelNormalization` and ``NORMALIZATION_SCHEMES``) is a bottom-layer module although it sits in the
``planning`` package: every stage may read plans. At import it pulls in only ``errors``, ``jsonio`` and
``planning/network_topology.py`` (and ``autoseg/planning/__init__.py`` imports nothing). Checking untrusted
plans asks the network registry (a known architecture, its parameter count), so ``autoseg.networks`` sits just
below the plans, and :class:`NetworkTopology`, which the architectures build from, sits below the networks in
``planning/network_topology.py`` (re-exported by ``plans.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "autoseg"

# Top first. Each entry is one layer: a tuple of groups (module prefixes; the longest matching prefix wins).
LAYERS: list[tuple[str, ...]] = [
    ("autoseg.__main__",),
    ("autoseg.cli",),
    ("autoseg.api",),
    ("autoseg.compare",),  # compare WORK: reads plans, validation summaries and training logs of every config
    ("autoseg.bundle",),  # export-model / import-model packs what selection chose
    ("autoseg.model_card",),  # the bundle's model card: reads what selection, validation and training wrote
    ("autoseg.selection",),  # find-best: cross-validation predictions, ensembles, postprocessing choice
    ("autoseg.validation",),  # final validation of a trained fold (predict + score), called by the api
    ("autoseg.training",),
    ("autoseg.inference",),  # never imports training
    ("autoseg.planning",),
    ("autoseg.fingerprint",),
    ("autoseg.preprocessing",),
    ("autoseg.postprocessing",),
    ("autoseg.evaluation",),
    ("autoseg.planning.plans",),  # typed artifacts shared by every stage (plans, normalization schemes)
    # below planning (the planner asks a network to describe itself) and below the plans (which check an
    # untrusted topology against the registry: known architecture, parameter count)
    ("autoseg.networks",),
    ("autoseg.planning.network_topology",),  # what an architecture builds from; plans.py re-exports it
    ("autoseg.phantom",),  # test/demo datasets, writes volumes through io
    ("autoseg.io",),
    ("autoseg.settings", "autoseg.checkpoint_io", "autoseg.undo"),
    ("autoseg.loss_spec",),  # loss expressions: parsed by the settings, built by networks/losses.py
    ("autoseg.distance",),  # signed distance maps (numpy): one definition for the loss and the stored maps
    ("autoseg.layout",),  # every name in a WORK folder, the fold list (settings check num_folds against it)
    ("autoseg.jsonio",),
    ("autoseg.atomic",),
    ("autoseg.errors", "autoseg"),  # ``autoseg`` itself: the package's __init__ (only __version__)
]

# Edges that may break the order while other helpers rewrite code (issue 14). Each entry is (importer,
# imported). It is empty and should stay so; test_known_violations_still_exist fails as soon as an entry is no
# longer needed, so the list can only shrink.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The autoseg module ``name`` loads (an attribute ``autoseg.x.f`` resolves to ``autoseg.x``)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, int]]:
    """Every autoseg module that ``module`` imports, anywhere in the file, with the line number."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from pkg import sub`` loads the submodule; ``from mod import name`` loads mod.
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in mods else source for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, mods) if name.split(".")[0] == "autoseg" else None
            if target and target != module and (target, node.lineno) not in found:
                found.append((target, node.lineno))
    return found


def _graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    mods = _modules()
    return mods, {m: _imports(m, p, mods) for m, p in mods.items()}


def _group(module: str) -> tuple[int, str]:
    """(layer index, group prefix) of ``module``: the longest prefix in :data:`LAYERS` that matches."""
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (i, prefix)
    assert best is not None, f"{module} is in no layer of LAYERS: add it to tests/test_layers.py"
    return best


def _violations() -> list[tuple[str, str, str]]:
    """(importer, imported, 'file:line: why') for every import that runs up or across the order."""
    mods, graph = _graph()
    out = []
    for module, targets in graph.items():
        layer, group = _group(module)
        for target, line in targets:
            t_layer, t_group = _group(target)
            if t_group == group or t_layer > layer:
                continue
            where = f"{mods[module].relative_to(ROOT.parent)}:{line}"
            how = "up" if t_layer < layer else "across"
            out.append((module, target, f"{where}: {module} imports {target} ({how} the layer order)"))
    return out


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    _, graph = _graph()
    edges = {m: sorted({t for t, _ in ts if (m, t) not in KNOWN_VIOLATIONS}) for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                result.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return result


def test_every_module_has_a_layer():
    for module in _modules():
        _group(module)  # asserts


def test_no_import_runs_up_the_layer_order():
    bad = [why for importer, imported, why in _violations() if (importer, imported) not in KNOWN_VIOLATIONS]
    assert not bad, "imports against the layer order (see LAYERS in tests/test_layers.py):\n" + "\n".join(bad)


def test_no_import_cycle():
    mods, graph = _graph()
    lines = []
    for comp in _cycles():
        lines.append(f"cycle among {len(comp)} modules: {', '.join(comp)}; one of them:")
        for m, t, line in _one_cycle(comp, graph):
            lines.append(f"  {mods[m].relative_to(ROOT.parent)}:{line}: {m} imports {t}")
    assert not lines, "\n".join(lines)


def _one_cycle(comp: list[str], graph) -> list[tuple[str, str, int]]:
    """A shortest cycle through ``comp[0]`` inside the strongly connected component ``comp``, as edges."""
    members, start = set(comp), comp[0]
    came: dict[str, tuple[str, int]] = {}
    todo = [start]
    while todo:
        nxt = []
        for m in todo:
            for t, line in graph[m]:
                if t in members and t not in came and (m, t) not in KNOWN_VIOLATIONS:
                    came[t] = (m, line)
                    nxt.append(t)
        if start in came:
            break
        todo = nxt
    edges, node = [], start
    while True:
        m, line = came[node]
        edges.append((m, node, line))
        node = m
        if node == start:
            return edges[::-1]


def test_known_violations_still_exist():
    """An allow-list entry that no longer matches a real violation must be removed (the list only shrinks)."""
    _, graph = _graph()
    real = {(importer, imported) for importer, imported, _ in _violations()}
    stale = sorted(KNOWN_VIOLATIONS - real - _cycle_edges(graph))
    assert not stale, (
        f"remove these from KNOWN_VIOLATIONS in tests/test_layers.py (no longer needed): {stale}"
    )


def _cycle_edges(graph: dict[str, list[tuple[str, int]]]) -> set[tuple[str, str]]:
    """Edges that lie on a cycle of the full graph (allow-list included)."""
    reach: dict[str, set[str]] = {}

    def reachable(start: str) -> set[str]:
        if start not in reach:
            seen, todo = set(), [start]
            while todo:
                for t, _ in graph[todo.pop()]:
                    if t not in seen:
                        seen.add(t)
                        todo.append(t)
            reach[start] = seen
        return reach[start]

    return {(m, t) for m, ts in graph.items() for t, _ in ts if m in reachable(t)}


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("autoseg.io.volume", "autoseg.api"),
        ("autoseg.inference.predictor", "autoseg.training.loop"),
        # the edges KNOWN_VIOLATIONS held until plans stopped asking planning/memory.py
        ("autoseg.planning.plans", "autoseg.planning.memory"),
        ("autoseg.networks.unet", "autoseg.planning.plans"),
    ],
)
def test_checker_catches_an_upward_import(importer, imported, monkeypatch):
    """The checker itself can fail: an added upward import is reported with its file and line."""
    real = _imports

    def with_extra(module, path, mods):
        found = real(module, path, mods)
        return found + [(imported, 999)] if module == importer else found

    monkeypatch.setattr(__import__(__name__, fromlist=["_imports"]), "_imports", with_extra)
    whys = [why for i, t, why in _violations() if (i, t) == (importer, imported)]
    assert any(":999: " in why and "up the layer order" in why for why in whys), whys


def test_checker_catches_a_cycle(monkeypatch):
    """An added edge that closes a loop (topology -> registry -> unet -> topology) is reported as a cycle."""
    real = _imports

    def with_extra(module, path, mods):
        found = real(module, path, mods)
        return (
            found + [("autoseg.networks.registry", 999)]
            if module == "autoseg.planning.network_topology"
            else found
        )

    monkeypatch.setattr(__import__(__name__, fromlist=["_imports"]), "_imports", with_extra)
    assert any(
        {"autoseg.planning.network_topology", "autoseg.networks.registry"} <= set(c) for c in _cycles()
    )
