"""Imports flow one way: the CLI on top, the maths at the bottom, and no cycle anywhere (counting imports inside
functions too, so a deferred import cannot hide one)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ddpo_cli"
# Each module may import only modules of its own layer or of layers below it (a list entry is a layer, top first).
# "x" stands for the module x.py or the package x/ with everything in it.
LAYERS = [
    {"__main__", "cli"},
    {"sample", "evaluate", "sweep", "trainer", "reward_server", "cluster", "planner", "doctor"},
    {"checkpoint", "probe", "pairs", "report", "guards", "books", "distributed", "watch"},
    {"rollout", "old_policy", "reference"},
    {"config", "monitors"},
    {"algorithms", "rewards", "prompts", "clients", "advantages", "preferences",
     "toyworld"},
    {"models", "samplers", "noise"},
    {"runs", "runtime", "schedules", "stats", "images", "text_features", "memory"},
    {"errors"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The ddpo_cli modules ``path`` imports (relative or absolute, at any depth of the file)."""
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif (node.module or "").startswith("ddpo_cli"):
                target = node.module.removeprefix("ddpo_cli").lstrip(".")
            else:
                continue
            names = [f"{target}.{a.name}".lstrip(".") for a in node.names]
            found.update(n if (PACKAGE / n.replace(".", "/")).with_suffix(".py").exists()
                         or (PACKAGE / n.replace(".", "/")).is_dir() else target for n in names)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("ddpo_cli.") for a in node.names if a.name.startswith("ddpo_cli."))
    return {f for f in found if f}


def layer_of(name: str) -> int:
    top = name.split(".")[0]
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in PACKAGE.rglob("*.py") if "conf" not in p.parts}


def test_every_module_has_a_layer():
    assert {name.split(".")[0] for name in graph() if name} <= set().union(*LAYERS)


def test_no_module_imports_a_module_above_it():
    upward = [(name, target) for name, targets in graph().items() if name for target in targets
              if layer_of(target) < layer_of(name)]
    assert not upward, upward


def test_there_is_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in edges.get(node, ()):
            if state.get(target) == 1:
                raise AssertionError(" -> ".join([*path, node, target]))
            if target not in state:
                visit(target, [*path, node])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [])
