"""The package's import layering and the Triton launch style, read from the sources (AST, no import):
no import cycle between the package's modules, the Triton coefficient passes (triton/passN_*.py) never
import each other and only triton/fused.py imports them, and every Triton launch ``kernel[grid](...)``
names its arguments (at most MAX_POSITIONAL positional ones)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "delta_kernels"
PASS = re.compile(r"pass\d+_\w+$")
ORCHESTRATOR = "delta_kernels.triton.fused"
MAX_POSITIONAL = 12


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, name: str):
    """(module, name or None) of each delta_kernels import that runs when ``path`` is imported
    (module level, also inside if/try at module level; imports inside functions run later)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.Import):
                found.update((a.name, None) for a in node.names if a.name.startswith("delta_kernels"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    up = up[:len(up) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if base.startswith("delta_kernels"):
                    found.update((base, a.name) for a in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
    visit(ast.parse(path.read_text()).body)
    return found


def _graph():
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}

    def target(base, name):  # "from . import x" imports the module x; "from .x import y" the module x
        return f"{base}.{name}" if f"{base}.{name}" in paths else base

    return {name: sorted({m for m in (target(*imp) for imp in _top_level_imports(p, name)) if m in paths and m != name})
            for name, p in paths.items()}


def _cycle(graph):
    """One import cycle as a list of modules, or None. A package's __init__ importing its own
    submodules is the normal direction; a submodule importing its package's __init__ back closes a
    cycle only through the modules that __init__ imports, which the walk follows."""
    state, stack = {}, []

    def walk(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open" and not node.startswith(nxt + "."):  # a parent package is loaded first
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for start in graph:
        if start not in state:
            found = walk(start)
            if found:
                return found
    return None


def test_no_import_cycle():
    assert _cycle(_graph()) is None, _cycle(_graph())


def test_the_cycle_check_can_fail():
    assert _cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert _cycle({"a": ["b"], "b": ["c"], "c": []}) is None


def test_triton_passes_import_no_other_pass():
    """pass1_... to pass5_... take what they share from the leaves (_common, row_partials,
    sketch_hash); only the orchestrating module fused.py imports the passes."""
    graph = _graph()
    passes = {m for m in graph if m.startswith("delta_kernels.triton.") and PASS.match(m.rpartition(".")[2])}
    assert len(passes) >= 5, sorted(passes)
    for name, imports in graph.items():
        if not name.startswith("delta_kernels.triton"):
            continue
        imported = passes.intersection(imports)
        if name in passes:
            assert not imported, f"{name} imports the pass modules {sorted(imported)} sideways"
        elif name != ORCHESTRATOR:
            assert not imported, f"{name} imports {sorted(imported)}; only {ORCHESTRATOR} imports the passes"
    assert passes <= set(graph[ORCHESTRATOR]), sorted(passes - set(graph[ORCHESTRATOR]))


def _launches(tree):
    """The ``kernel[grid](...)`` calls of a module: a call of a subscript of a name ending in "kernel"."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            target = node.func.value
            name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
            if name.endswith("kernel"):
                yield name, node


def test_triton_launches_name_their_arguments():
    count = 0
    for path in PACKAGE.rglob("*.py"):
        for name, call in _launches(ast.parse(path.read_text())):
            count += 1
            where = f"{path.relative_to(PACKAGE.parent)}:{call.lineno} {name}"
            assert not any(isinstance(a, ast.Starred) for a in call.args), f"{where}: a *args launch"
            assert len(call.args) <= MAX_POSITIONAL, f"{where}: {len(call.args)} positional arguments"
    assert count >= 12, f"only {count} launches found: the scan no longer sees them"


@pytest.mark.parametrize("source,bad", [("k_kernel[(1,)](" + ", ".join("abcdefghijklm") + ")", True),
                                        ("k_kernel[(1,)](*xs)", True), ("k_kernel[(1,)](a, b=1)", False)])
def test_the_launch_scan_can_fail(source, bad):
    tree = ast.parse(source)
    (name, call), = list(_launches(tree))
    too_many = len(call.args) > MAX_POSITIONAL or any(isinstance(a, ast.Starred) for a in call.args)
    assert too_many == bad
