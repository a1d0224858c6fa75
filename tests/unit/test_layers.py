"""The one-way layer rule, one import name per module and no import cycles, checked on every module's source.

``kestrel.streams`` -> ``kestrel.offline`` -> ``kestrel.models`` ->
``kestrel.feature_store``: a layer imports only the layers below it, and that
holds for every import, inside functions and ``TYPE_CHECKING`` blocks too (the
files are parsed, not imported, so a lazy import cannot hide a dependency).
The layers are reached only through the ``kestrel`` namespace: a bare
``import streams`` would load a second copy of a module under another name.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("feature_store", "models", "offline", "streams")
ALLOWED = {"feature_store": set(), "models": {"feature_store"}, "offline": {"models", "feature_store"},
           "streams": {"offline", "models", "feature_store"}}


def _modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        for path in (ROOT / "kestrel" / layer).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            out[".".join(p for p in rel.parts if p != "__init__")] = path
    return out


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every absolute import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "kestrel" and len(parts) > 1 and parts[1] in LAYERS else None


def test_every_import_points_down_the_layers() -> None:
    bad = []
    for name, path in _modules().items():
        layer = _layer(name)
        for line, module, _ in _imports(path):
            target = _layer(module)
            if target is not None and target != layer and target not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(ROOT)}:{line} {layer} -> {module}")
    assert bad == []


def test_layers_are_imported_only_through_the_kestrel_namespace() -> None:
    sources = [p for d in ("kestrel", "tests", "bench") for p in (ROOT / d).rglob("*.py")]
    bad = [f"{p.relative_to(ROOT)}:{line} {module}" for p in sources for line, module, _ in _imports(p)
           if module.split(".")[0] in LAYERS]
    assert bad == []


def test_no_import_cycles() -> None:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for _, module, names in _imports(path):
            for target in (module, *(f"{module}.{n}" for n in names)):
                if target in mods and target != m:
                    graph[m].add(target)
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append([*path[path.index(n):], n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from kestrel.streams.worker.app import create_app\n")
    assert [(m, n) for _, m, n in _imports(src)] == [("kestrel.streams.worker.app", ["create_app"])]
