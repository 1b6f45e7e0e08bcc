"""The house plan, checked: imports point one way (cli -> report -> capacity -> measure -> model -> base -> kernels),
no module imports another in a loop, `kernels/` (tokenfleet.kernels) never imports the
rest of `tokenfleet`, and no `importlib` hides an import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE = ("tokenfleet", "tokenfleet.config", "tokenfleet.dtypes", "tokenfleet.files", "tokenfleet.hardware",
        "tokenfleet.output", "tokenfleet.provenance", "tokenfleet.results")
# Higher may import lower or equal; a wing may import itself. The base is one level; kernels sit under it.
LAYERS = {"tokenfleet.kernels": 0, "base": 1, "tokenfleet.model": 2, "tokenfleet.measure": 3, "tokenfleet.capacity": 4,
          "tokenfleet.report": 5, "tokenfleet.cli": 6, "tokenfleet.__main__": 7}


# The folders as pyproject.toml installs them: harness/ is the package `tokenfleet`, kernels/ is `tokenfleet.kernels`.
PACKAGE_OF = {"harness": ["tokenfleet"], "kernels": ["tokenfleet", "kernels"]}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts[:1] = PACKAGE_OF[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = [*sorted((ROOT / "harness").rglob("*.py")), *sorted((ROOT / "kernels").rglob("*.py"))]
    return {_module_name(p): p for p in files}


def _layer(module: str) -> tuple[int, str]:
    if module in BASE:
        return LAYERS["base"], "base"
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix], prefix
    raise AssertionError(f"{module} is in no layer of the plan: add it to tests/test_architecture.py")


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules this file imports at any depth (functions included), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # `from tokenfleet.report import plots` imports the module tokenfleet.report.plots
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in known}


GRAPH = {name: _imports(path, set(_modules())) for name, path in _modules().items()}


def test_every_module_has_a_layer():
    for name in GRAPH:
        _layer(name)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    level, wing = _layer(module)
    for dep in GRAPH[module]:
        dep_level, dep_wing = _layer(dep)
        assert dep_level < level or dep_wing == wing, (
            f"{module} ({wing}) imports {dep} ({dep_wing}): imports point cli -> report -> capacity -> measure -> "
            "model -> base -> kernels")


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if d == m or d == m.rpartition(".")[0]:
                continue  # a package's own __init__ and `from pkg import sub` inside it are not a loop
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                walk(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            walk(m)


def test_no_importlib_indirection():
    for name, path in _modules().items():
        assert "importlib.import_module" not in path.read_text(), f"{name}: import it, do not hide it behind importlib"


def test_the_check_catches_an_upward_import(tmp_path):
    """The walker sees imports inside functions: a measure module importing the report would be flagged."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from tokenfleet.report import tables\n")
    assert _imports(f, set(GRAPH)) == {"tokenfleet.report.tables"}
    assert _layer("tokenfleet.report.tables")[0] > _layer("tokenfleet.measure.runner")[0]
