"""The package's shape, read from its source: imports run one way, and nothing grows past the sizes
the project holds itself to (docs/development.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from app import ROOT

PACKAGE = ROOT / "syncbn"
LAYER = {"syncbn", "syncbn.functional", "syncbn.comm", "syncbn.batchnorm", "syncbn.cost", "syncbn.nccl_tuner",
         "syncbn.join", "syncbn.precise"}  # what a user imports into their own job
# The floors, lowest first (docs/development.md draws them): a module imports from its own part or
# from a floor below it, never up, never sideways. A new module must be given its place here.
FLOORS = [
    {"the layer": tuple(LAYER)},
    {"errors": ("syncbn.errors",)},
    {"distributed": ("syncbn.distributed", "syncbn.slurm", "syncbn.rank_server", "syncbn.counting")},
    {"training": ("syncbn.training",)},
    {"experiments": ("syncbn.experiments",), "bench": ("syncbn.bench",)},
    {"the Hydra app": ("syncbn.train", "syncbn.endings", "syncbn.launchers", "syncbn.plan"),
     "the old commands": ("syncbn.plot", "syncbn.study")},
    {"the torchrun wrapper": ("syncbn.torchrun",)},
]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """The package's modules that ``path`` imports (``from syncbn import x`` counts as ``syncbn.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                      for alias in node.names}
    return {name for name in found if name in MODULES and name != module_name(path)}


def cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A chain of imports from ``start`` back to itself, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        name, chain = stack.pop()
        for imported in graph[name]:
            if imported == start:
                return chain + [start]
            if imported not in seen:
                seen.add(imported)
                stack.append((imported, chain + [imported]))
    return None


def test_no_module_imports_itself_back_through_others():
    graph = {name: imports_of(path) for name, path in MODULES.items()}
    assert {name: cycle for name in graph if (cycle := cycle_from(name, graph))} == {}


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert cycle_from("a", {"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_from("a", {"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert cycle_from("a", {"a": {"b"}, "b": {"b"}}) is None, "b's own loop is not a's"


@pytest.mark.parametrize("name", sorted(LAYER))
def test_the_layer_imports_nothing_of_the_application(name):
    assert imports_of(MODULES[name]) <= LAYER


def place(name: str, floors: list[dict] = FLOORS) -> tuple[int, str]:
    """(floor, part) of a module: the part that names it or a package above it."""
    for floor, parts in enumerate(floors):
        for part, names in parts.items():
            if any(name == n or (n != "syncbn" and name.startswith(n + ".")) for n in names):
                return floor, part
    raise LookupError(f"{name} has no place in FLOORS")


def upward_or_sideways(name: str, floors: list[dict] = FLOORS) -> list[str]:
    floor, part = place(name, floors)
    return [imported for imported in sorted(imports_of(MODULES[name]))
            if place(imported, floors)[1] != part and place(imported, floors)[0] >= floor]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports_only_its_own_part_and_the_floors_below(name):
    assert upward_or_sideways(name) == []


def test_the_floors_place_a_module_by_its_package_and_refuse_a_stranger():
    floors = [{"low": ("syncbn",)}, {"pkg": ("syncbn.training",)}, {"top": ("syncbn.train",)}]
    assert place("syncbn.training.loop", floors) == (1, "pkg")
    assert place("syncbn.train", floors) == (2, "top"), "syncbn.train is not under syncbn.training"
    with pytest.raises(LookupError):
        place("syncbn.newcomer", floors)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_class_over_150_lines(name):
    tree = ast.parse(MODULES[name].read_text())
    long = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno >= 150}
    assert long == {}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_over_400_lines_and_no_function_over_80(name):
    source = MODULES[name].read_text()
    assert len(source.splitlines()) <= 400
    long = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80}
    assert long == {}
