"""The package's modules import each other without cycles: the import graph of
src/henderson, read from the source (imports inside functions included), is acyclic.
A cycle held together by imports inside functions hides which stage depends on which."""
import ast
from pathlib import Path

import henderson

PACKAGE = Path(henderson.__file__).parent


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [a.name for a in node.names]
                graph[name].update(t.split(".")[0] for t in targets if t.split(".")[0] in modules)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("henderson."):
                target = node.module.split(".")[1]
                if target in modules:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by depth-first search (each reported once)."""
    found, seen = [], set()

    def visit(node, path):
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycle = path[path.index(nxt):]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append(cycle + [nxt])
            elif len(path) < 12:
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_import_leaves_heavy_modules_for_their_first_use():
    """``import henderson`` does not load scipy.stats, scipy.optimize or the plotting
    and CHOLMOD libraries (~0.6 s of a 1.9 s import, docs/benchmarks.md): the
    functions that need them import them."""
    import os
    import subprocess
    import sys

    heavy = ["scipy.stats", "scipy.optimize", "matplotlib", "sksparse", "nlopt"]
    code = ("import sys, henderson; print(','.join(m for m in %r if m in sys.modules))"
            % (heavy,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert out.stdout.strip() == ""
