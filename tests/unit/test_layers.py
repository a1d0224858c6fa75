"""The one-way layer rule and the absence of import cycles, checked on every module's source.

``streams`` -> ``offline`` -> ``models`` -> ``feature_store``: a layer imports
only the layers below it, and that holds for every import, inside functions
and ``TYPE_CHECKING`` blocks too (the files are parsed, not imported, so a
lazy import cannot hide a dependency).
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
        for path in (ROOT / layer).rglob("*.py"):
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


def test_every_import_points_down_the_layers() -> None:
    bad = []
    for name, path in _modules().items():
        layer = name.split(".")[0]
        for line, module, _ in _imports(path):
            target = module.split(".")[0]
            if target in LAYERS and target != layer and target not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(ROOT)}:{line} {layer} -> {module}")
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
    src.write_text("def f():\n    from streams.app import create_app\n")
    assert [(m, n) for _, m, n in _imports(src)] == [("streams.app", ["create_app"])]
