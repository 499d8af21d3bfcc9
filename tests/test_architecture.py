"""The layering of the package (docs/architecture.md), checked on the source:

* the core (losses, criterion, hooks, distributed, functional) imports only the standard
  library, torch, numpy and other core modules: never the training tool, the datasets,
  the models, viz or the integrations;
* no import circle between pixreg modules (module-level and function-level imports alike);
* viz imports no private name from the training tool or the losses;
* no function of the training package is much longer than a screen.
"""
from __future__ import annotations

import ast
import os
import sys
from typing import Dict, List, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "pixreg")
CORE = ("pixreg.losses", "pixreg.criterion", "pixreg.hooks", "pixreg.distributed", "pixreg.functional")
NOT_CORE = ("pixreg.train", "pixreg.data", "pixreg.models", "pixreg.viz", "pixreg.integrations", "pixreg.cli")


def _modules() -> Dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(name: str, path: str) -> List[ast.ImportFrom | ast.Import]:
    return [n for n in ast.walk(ast.parse(open(path).read())) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _targets(name: str, path: str, node) -> List[str]:
    """Absolute module names imported by ``node`` (``from . import x`` gives ``pkg.x``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    graph: Dict[str, Set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for node in _imports(name, path):
            deps.update(t for t in _targets(name, path, node) if t in mods and t != name)
        graph[name] = deps
    return graph


def test_core_imports_only_torch_numpy_and_the_core():
    mods = _modules()
    allowed_third_party = {"torch", "numpy"}
    bad = []
    for name, path in mods.items():
        if not name.startswith(CORE):
            continue
        for node in _imports(name, path):
            for target in _targets(name, path, node):
                top = target.split(".")[0]
                if target.startswith(NOT_CORE):
                    bad.append(f"{name} imports {target}")
                elif top != "pixreg" and top not in allowed_third_party and top not in sys.stdlib_module_names:
                    bad.append(f"{name} imports third-party {target}")
    assert not bad, "\n".join(bad)


def test_the_core_check_would_catch_a_forbidden_import(tmp_path):
    # the check above must be able to fail: a core-like module importing the trainer is found
    node = ast.parse("from ..train.trainer import train").body[0]
    assert any(t.startswith(NOT_CORE) for t in _targets("pixreg.losses.car", "pixreg/losses/car.py", node))


def test_no_import_circle():
    graph = _graph()
    state: Dict[str, int] = {}
    cycles: List[List[str]] = []

    def visit(node: str, stack: List[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + "."):  # a package importing its own submodules is not a circle
                continue
            if state.get(dep) == 1 and not node.startswith(dep + "."):
                cycles.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_viz_imports_no_private_name_of_train_or_losses():
    mods = _modules()
    bad = []
    for name, path in mods.items():
        if not name.startswith("pixreg.viz"):
            continue
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _targets(name, path, node)[0]
                if target.startswith(("pixreg.train", "pixreg.losses")):
                    bad += [f"{name}: {target}.{a.name}" for a in node.names if a.name.startswith("_")]
                    bad += [f"{name}: {target}" for _ in [0] if any(p.startswith("_") for p in target.split("."))]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if isinstance(node.value, ast.Name) and node.value.id in ("rch", "car", "cplus1", "lall", "trainer", "run"):
                    bad.append(f"{name}: {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_training_functions_fit_on_a_screen():
    long = []
    for name, path in _modules().items():
        if not name.startswith("pixreg.train"):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 70:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, "\n".join(long)
