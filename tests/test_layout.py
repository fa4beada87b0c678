"""The package's architecture, checked: no import cycles, and no layer importing a higher one.

Layers, bottom to top (see src/gvpo_offline/__init__.py and docs/architecture.md):
math < runtime < model < data < stages < the entry points (cli, __main__, the public aliases).
Every ``import`` counts, also those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gvpo_offline"
LAYERS = ["math", "runtime", "model", "data", "stages"]
ENTRY = len(LAYERS)  # cli.py, __main__.py, __init__.py and the public aliases loss.py, reference.py, rewards.py


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else ENTRY


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``module`` imports (at any depth of its code)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gvpo_offline")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("gvpo_offline"):
                continue
            for alias in node.names:  # `from pkg import submodule` depends on the submodule itself
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in out if m in known and m != module}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {m: imports(m, p, set(found)) for m, p in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_graph_is_read():
    edges = graph()
    assert "gvpo_offline.stages.train.recipe" in edges and "gvpo_offline.math.loss" in edges
    assert "gvpo_offline.math.loss" in edges["gvpo_offline.stages.train.recipe"]
    assert "gvpo_offline.model.logprobs" in edges["gvpo_offline.stages.train.step"]
    assert len(edges) >= 40


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_layer_imports_a_higher_one():
    bad = [f"{m} ({LAYERS[layer(m)] if layer(m) < ENTRY else 'entry'}) imports {n}"
           for m, deps in graph().items() for n in deps
           if n != "gvpo_offline" and layer(n) > layer(m)]
    assert not bad, "\n".join(bad)


def test_math_is_pure():
    """The loss and the metrics import nothing of the package and do no I/O."""
    for m, deps in graph().items():
        if layer(m) == 0:
            assert not deps, f"{m} imports {deps}"
            text = modules()[m].read_text()
            assert "open(" not in text and "Path(" not in text, m


@pytest.mark.parametrize("cycle_edges,expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
])
def test_cycle_finder(cycle_edges, expected):
    assert find_cycle(cycle_edges) == expected


def test_modules_stay_small():
    """A module past ~500 lines is split along its seams (cli.py, the command table, excepted up to 600)."""
    limit = {"gvpo_offline.cli": 600}
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > limit.get(m, 520)}
    assert not long, long


def test_architecture_diagram_names_every_module():
    """docs/architecture.md's layer diagram names every module, so a reader finds each one in its layer."""
    text = (PACKAGE.parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    diagram = text.split("```")[1]
    stems = {p.stem for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    missing = sorted(s for s in stems if not re.search(rf"\b{s}\b", diagram))
    assert not missing, f"add to the diagram in docs/architecture.md: {missing}"


def test_public_import_paths():
    import gvpo_offline
    import gvpo_offline.loss
    import gvpo_offline.math.loss
    import gvpo_offline.reference
    import gvpo_offline.stages.reference

    import gvpo_offline.data.rewards
    import gvpo_offline.rewards

    assert gvpo_offline.loss is gvpo_offline.math.loss
    assert gvpo_offline.rewards is gvpo_offline.data.rewards
    assert gvpo_offline.reference is gvpo_offline.stages.reference
    assert gvpo_offline.gvpo_loss is gvpo_offline.math.loss.gvpo_loss
    assert callable(gvpo_offline.reference.precompute) and callable(gvpo_offline.reference.load_split)
