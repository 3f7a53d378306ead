"""engine/ has no import cycle and imports neither ray nor actors/jobs; every engine module
imports on its own in a fresh interpreter.

The graph counts every import statement of a module, including those inside functions (a
deferred import hides a cycle from the interpreter, not from the reader). An import of a
module's own parent package is not an edge: Python runs the parent's ``__init__`` first, so
``engine.surrogate.train`` importing from ``engine.surrogate.config`` is no cycle even though
``engine/surrogate/__init__.py`` imports both.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "engine"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def engine_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ENGINE.rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The engine module that ``import name`` runs last (``a.b.c`` -> ``a.b`` when c is a name)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    known = engine_modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                dep = _resolve(t, known)
                if dep and dep != mod and not mod.startswith(dep + "."):  # parent packages: no edge
                    graph[mod].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_engine_has_no_import_cycle():
    graph = import_graph()
    assert "engine.surrogate.models" in graph  # the walk sees the packages
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_engine_imports_no_ray_actors_or_jobs():
    bad = []
    for mod, path in engine_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{mod}: {n}" for n in names if n.split(".")[0] in ("ray", "actors", "jobs")]
    assert not bad, bad


@pytest.mark.slow
def test_every_engine_module_imports_alone():
    """Each module imported first, in its own interpreter (an import-order bug shows only there)."""
    failed = []
    for mod in engine_modules():
        r = subprocess.run([sys.executable, "-c", f"import {mod}"], cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            failed.append(f"{mod}: {r.stderr.strip().splitlines()[-1]}")
    assert not failed, failed
