"""The package's import layout: imports run one way, cli → experiments → library, with no cycle and no gendiff
import written inside a function (optional heavy third-party packages may stay lazy).

Breakages tried (each fails here): `from .kinds import load_run` written inside a function of
experiments/html.py (test_no_gendiff_import_inside_a_function); `from .experiments.recipes import TOY_RECIPES`
added to gendiff/train.py (test_imports_run_one_way_cli_experiments_library); `from . import mixture_eval` at
the end of mixture_metrics.py, a cycle that still imports (test_no_import_cycle); a cycle that breaks the
import (heads.py importing precond) already fails at collection.
"""
import ast
import os

import gendiff

ROOT = os.path.dirname(gendiff.__file__)


def _modules():
    for dirpath, _, files in os.walk(ROOT):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                yield (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel), path


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: str):
    """(imported gendiff module, line, inside a function?) for every import of the module."""
    tree = ast.parse(open(path).read())
    is_package = path.endswith("__init__.py")
    in_function = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function |= {id(n) for n in ast.walk(fn)} - {id(fn)}
    type_checking = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking |= {id(n) for n in ast.walk(node)}
    known = {m for m, _ in _modules()}
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        # `from . import x` imports the submodule x; `from .m import f`, the module m
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, is_package)
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            names = subs or [target]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "gendiff" and name in known:
                yield name, node.lineno, id(node) in in_function


def _graph():
    return {m: {t for t, _, _ in _imports(m, p)} - {m} for m, p in _modules()}


def test_no_gendiff_import_inside_a_function():
    found = [f"{m}:{line} imports {t}" for m, p in _modules() for t, line, inside in _imports(m, p) if inside]
    assert not found, "gendiff imports written inside functions:\n" + "\n".join(found)


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            # a package's __init__ importing its own submodules is how packages work, not a cycle
            if t.startswith(m + ".") or state.get(t) == "done":
                continue
            if state.get(t) == "open":
                cycles.append(" → ".join(stack[stack.index(t):] + [t]) if t in stack else f"{m} → {t}")
                continue
            visit(t, stack + [t])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_run_one_way_cli_experiments_library():
    def layer(m):
        return 2 if m == "gendiff.cli" else 1 if m.startswith("gendiff.experiments") else 0
    bad = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})" for m, ts in _graph().items() for t in ts
           if layer(t) > layer(m) and m != "gendiff"]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_walker_sees_what_it_must():
    """The checks above are only as good as the walker: it must resolve relative imports and see the real
    edges (a layout test that finds no imports would pass vacuously)."""
    graph = _graph()
    assert "gendiff.heads" in graph["gendiff.precond"]
    assert "gendiff.experiments.recipes" in graph["gendiff.experiments.config"]
    assert "gendiff.experiments.kinds" in graph["gendiff.cli"]
    assert sum(map(len, graph.values())) > 80
