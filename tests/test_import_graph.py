"""No import cycles between llamaserve's sub-packages, read from the source (imports inside
functions included, since a lazy import is still a dependency), and the server process's
modules stay torch-free (it parses arguments and starts the engine before torch loads)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import llamaserve

ROOT = Path(llamaserve.__file__).parent


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every llamaserve module `path` imports, anywhere in the file."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
    return {m for m in found if m == "llamaserve" or m.startswith("llamaserve.")}


def _unit(module: str) -> str:
    """The sub-package (or top-level module) a module belongs to: llamaserve.server.app -> server."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "llamaserve"


def import_graph(root: Path = ROOT) -> dict[str, dict[str, set[str]]]:
    """unit -> {imported unit -> files that import it}."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in sorted(root.rglob("*.py")):
        src = _unit(_module_name(path, root))
        for target in _imports(path, root):
            dst = _unit(target)
            if dst != src:
                graph[src][dst].add(str(path.relative_to(root)))
    return graph


def find_cycle(graph: dict[str, dict[str, set[str]]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "llamaserve"
    for sub in ("a", "b"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from llamaserve.b import y\n")
    (pkg / "b" / "y.py").write_text("def f():\n    from ..a import x\n    return x\n")
    graph = import_graph(pkg)
    assert find_cycle(graph) in (["a", "b", "a"], ["b", "a", "b"])
    (pkg / "b" / "y.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(pkg)) is None


def test_no_import_cycles_between_subpackages():
    graph = import_graph()
    assert "server" in graph and "engine" in graph["server"]  # the graph was really read
    cycle = find_cycle(graph)
    if cycle:
        hops = [f"{a} -> {b} ({', '.join(sorted(graph[a][b]))})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle between sub-packages:\n  " + "\n  ".join(hops))


def test_server_process_arguments_and_engine_args_do_not_import_torch():
    code = ("import sys, argparse\n"
            "from llamaserve.server.settings import add_server_arguments, settings_from_args\n"
            "from llamaserve.server.engine_client import EngineClient\n"
            "p = argparse.ArgumentParser(); add_server_arguments(p)\n"
            "s = settings_from_args(p.parse_args(['--model', 'mock']), {})\n"
            "assert s.engine.mock\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
