"""The shape of the library, checked: ruff is clean; project modules import each other at module top and
never in a circle; no parameter name is spelled outside the tables that own them (params.py for canonical
names, families.py for Hugging Face's, megatron/mapping.py for megatron-core's)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from hyperclone_dist.families import FAMILIES
from hyperclone_dist.megatron.mapping import LOCAL_SPEC, TE_RENAMES
from hyperclone_dist.params import RULES

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "hyperclone_dist"
TABLES = {"params.py", "families.py", "megatron/mapping.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """The project modules an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if isinstance(node, ast.ImportFrom) and node.module in modules:
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
    return []


def test_ruff_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_project_imports_are_at_module_top_and_acyclic():
    modules = _modules()
    graph, late = {}, []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        graph[name] = {m for node in tree.body for m in _imported(node, modules)}
        for node in ast.walk(tree):
            if name == "hyperclone_dist" and getattr(node, "name", None) == "__getattr__":
                continue  # the package's lazy ``hyperclone_dist.grow`` (PEP 562): the one deferred import
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                late += [f"{path.relative_to(REPO)}:{n.lineno} imports {m}" for n in ast.walk(node)
                         for m in _imported(n, modules)]
    assert not late, "function-level imports of project modules:\n" + "\n".join(late)
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _name_fragments() -> set[str]:
    """Every parameter name the tables hold, as its last two dotted parts (``q.weight``, ``q_proj.weight``,
    ``linear_fc1.weight``, ``embed.weight``...): what any spelling of the name contains."""
    names = set(RULES)
    names |= {row.name for row in LOCAL_SPEC} | set(TE_RENAMES) | set(TE_RENAMES.values())
    names |= {hf for family in FAMILIES.values() for hf in family.names}
    return {".".join(name.split(".")[-2:]) for name in names}


def test_parameter_names_live_only_in_their_tables():
    fragments = _name_fragments()
    assert {"q.weight", "linear_fc1.weight", "q_proj.weight", "head.weight", "lm_head.weight"} <= fragments
    pattern = re.compile(r"(?<![\w.])(?:[\w]+\.)*(" + "|".join(map(re.escape, sorted(fragments))) + r")(?![\w])")
    found = []
    for path in _modules().values():
        relative = path.relative_to(LIBRARY).as_posix()
        if relative in TABLES:
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{relative}:{lineno}: {line.strip()}")
    assert not found, "parameter names outside the tables:\n" + "\n".join(found)
