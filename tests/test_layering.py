"""The package's floors only point down, and no modules import each other (read from the source).

Floors, bottom to top: foundations (config, sharding, distributed, hlo); the model (with LoRA and
log-probs) and data; what is built on a model (checkpoints, inference, objectives, the generic
train loop); alignment; analysis; the `arlm` facade; the runnable jobs. A module may import from
its own package or from a lower floor, never from a higher floor or a sibling package on its own
floor, and the module-level import graph has no cycle. Imports inside functions count too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "arlm"

FLOORS: list[tuple[str, ...]] = [
    ("arlm.config", "arlm.sharding", "arlm.distributed", "arlm.hlo"),
    ("arlm.model", "arlm.data"),
    ("arlm.checkpoints", "arlm.inference", "arlm.objectives", "arlm.train"),
    ("arlm.alignment",),
    ("arlm.analysis",),
    ("arlm",),                      # the facade: arlm/__init__.py
    ("arlm.jobs",),
]


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """The arlm modules `name` imports (`from pkg import mod` resolves to the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in ("arlm", "experiments")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] not in ("arlm", "experiments"):
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in MODULES else module)
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _home(name: str) -> tuple[int, str]:
    """(floor index, the floor entry that holds `name`): the longest matching entry."""
    best = None
    for i, floor in enumerate(FLOORS):
        for entry in floor:
            if name == entry or name.startswith(entry + ".") and entry != "arlm":
                if best is None or len(entry) > len(best[1]):
                    best = (i, entry)
    if best is None:
        raise AssertionError(f"{name} is on no floor: add its package to FLOORS in {__file__}")
    return best


def test_every_module_has_a_floor():
    for name in MODULES:
        _home(name)


def test_imports_point_down():
    upward = []
    for name, targets in GRAPH.items():
        floor, package = _home(name)
        for target in targets:
            if target.split(".")[0] == "experiments":
                upward.append(f"{name} -> {target} (the library never imports experiments)")
                continue
            t_floor, t_package = _home(target)
            if t_package == package:
                continue
            if t_floor >= floor:
                upward.append(f"{name} (floor {floor}) -> {target} (floor {t_floor})")
    assert not upward, "imports that do not point down:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    state: dict[str, int] = {}          # 1: on the stack, 2: done
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in MODULES:
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(MODULES):
        if name not in state:
            visit(name)
    # a package's __init__ re-exporting its own submodules is not a cycle between two modules
    real = [c for c in cycles if not any(a == b.rpartition(".")[0] or b == a.rpartition(".")[0]
                                         for a, b in zip(c, c[1:]))]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


@pytest.mark.parametrize("module, expected_floor", [("arlm.model.lora", 1), ("arlm.model.log_probs", 1),
                                                    ("arlm.jobs.align", len(FLOORS) - 1)])
def test_the_moved_concepts_sit_where_the_issue_puts_them(module, expected_floor):
    assert module in MODULES and _home(module)[0] == expected_floor


def test_the_checker_sees_an_upward_import(tmp_path):
    """The reader resolves relative and `from pkg import mod` forms; a planted upward import is caught."""
    path = tmp_path / "probe.py"
    path.write_text("from arlm.jobs import align\nfrom ..objectives import kl\nimport arlm.analysis.drift\n")
    found = _imports("arlm.model.probe", path)
    assert found == {"arlm.jobs.align", "arlm.objectives.kl", "arlm.analysis.drift"}
    assert all(_home(t)[0] > _home("arlm.model.probe")[0] for t in found)
