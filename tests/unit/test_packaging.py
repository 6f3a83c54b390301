"""Packaging and architecture rules that would otherwise rot silently."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]

# Library layers must not reach up into the layers that configure and drive them
# (architecture.md: lower layers never import higher ones; the library works without a config).
FORBIDDEN = {
    "dist_reid.data": (
        "dist_reid.models",
        "dist_reid.losses",
        "dist_reid.evaluation",
        "dist_reid.engine",
        "dist_reid.cli",
        "dist_reid.builders",
        "dist_reid.config",
        "dist_reid.tune",
        "dist_reid.bench",
        "dist_reid.viz",
    ),
    "dist_reid.models": (
        "dist_reid.data",
        "dist_reid.evaluation",
        "dist_reid.engine",
        "dist_reid.cli",
        "dist_reid.builders",
        "dist_reid.config",
        "dist_reid.tune",
        "dist_reid.bench",
    ),
    "dist_reid.losses": (
        "dist_reid.data",
        "dist_reid.evaluation",
        "dist_reid.engine",
        "dist_reid.cli",
        "dist_reid.builders",
        "dist_reid.config",
        "dist_reid.tune",
        "dist_reid.bench",
    ),
    "dist_reid.evaluation": (
        "dist_reid.models",
        "dist_reid.losses",
        "dist_reid.engine",
        "dist_reid.cli",
        "dist_reid.builders",
        "dist_reid.config",
        "dist_reid.tune",
        "dist_reid.bench",
    ),
    "dist_reid.config": (
        "dist_reid.data",
        "dist_reid.models",
        "dist_reid.losses",
        "dist_reid.evaluation",
        "dist_reid.engine",
        "dist_reid.cli",
        "dist_reid.builders",
    ),
    "dist_reid.engine": ("dist_reid.cli", "dist_reid.tune"),
    "dist_reid.viz": (
        "dist_reid.config",
        "dist_reid.engine",
        "dist_reid.builders",
        "dist_reid.cli",
        "dist_reid.tune",
    ),
    "reid_kernels": ("dist_reid",),
}


def _modules() -> dict[str, Path]:
    found = {}
    for base, package in ((REPO / "dist_reid", "dist_reid"), (REPO / "kernels", "reid_kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(path: Path, module: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.rsplit(".", node.level - (path.name == "__init__.py"))[0]
                names.add(f"{package}.{node.module}" if node.module else package)
            elif node.module:
                names.add(node.module)
    return names


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert config["package-dir"]["reid_kernels"] == "kernels"
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "dist_reid").rglob("__init__.py")
    } | {"reid_kernels"}
    assert on_disk == listed


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_higher_ones(layer):
    offenders = []
    for module, path in _modules().items():
        if module == layer or module.startswith(layer + "."):
            for name in _imports(path, module):
                if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[layer]):
                    offenders.append(f"{module} imports {name}")
    assert not offenders, offenders


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {m: {n for n in _imports(p, m) if n in modules and n != m} for m, p in modules.items()}
    # A package importing its own submodules (re-exports) is not a cycle worth reporting.
    for m in graph:
        graph[m] = {n for n in graph[m] if not n.startswith(m + ".")}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle.extend([*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*stack, nxt]):
                return True
        state[node] = 2
        return False

    for m in graph:
        if state.get(m) is None and visit(m, [m]):
            break
    assert not cycle, " -> ".join(cycle)
