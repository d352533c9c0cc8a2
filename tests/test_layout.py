"""The package's layout is its pipeline: imports go only downwards, and no two modules import each other.

The import graph is read from the source with ``ast`` (every ``import`` and ``from ... import``,
those inside functions and under ``TYPE_CHECKING`` included: a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hooked_vllm"

#: the stages, bottom first; a module may import its own stage and the layers below it, never a peer
#: stage of its layer or anything above. The package's root ``__init__`` is the public facade: it may
#: import anything, and nothing inside the package imports it.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("kernels", "adapters"),
    ("tiny_models",),
    ("demo",),  # below the model: HookedVLM.from_pretrained("demo") finds the shipped model
    ("model",),
    ("analysis",),
    ("interventions",),
    ("runs",),
    ("activations", "report"),
    ("studies",),  # published experiments on the run store, each with its report (issue 29)
    ("cli",),
    ("testing",),
]
ROOT = "hooked_vllm"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (``from pkg import submodule`` names the submodule)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t == ROOT or t.startswith(ROOT + "."))
    found.discard(name)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    paths = {module_name(p): p for p in package.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return None if len(parts) == 1 else parts[1]


def layer_of(stage: str) -> int | None:
    return next((i for i, stages in enumerate(LAYERS) if stage in stages), None)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every edge that goes up (or sideways to a peer stage), and every module in no stage."""
    problems = []
    for module, targets in sorted(graph.items()):
        if module == ROOT:
            continue
        stage = stage_of(module)
        if layer_of(stage) is None:
            problems.append(f"{module} belongs to no stage of the layout (LAYERS in {Path(__file__).name})")
            continue
        for target in sorted(targets):
            target_stage = stage_of(target)
            if target == ROOT:
                problems.append(f"{module} -> {target}: the public facade is for users, import the module")
            elif target_stage == stage:
                continue
            elif layer_of(target_stage) is None or layer_of(target_stage) >= layer_of(stage):
                problems.append(f"{module} -> {target}: {stage} may not import {target_stage}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles, each as the modules along it (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(cycle) for cycle in found)


def test_imports_go_only_downwards():
    problems = upward_imports(import_graph())
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_planted_cycle_and_an_upward_import():
    graph = {
        "hooked_vllm.model.a": {"hooked_vllm.model.b"},
        "hooked_vllm.model.b": {"hooked_vllm.model.a", "hooked_vllm.errors"},
        "hooked_vllm.adapters.llava": {"hooked_vllm.model.a"},
        "hooked_vllm.analysis.x": {"hooked_vllm.report.html", "hooked_vllm"},
        "hooked_vllm.errors": set(),
    }
    assert cycles(graph) == [["hooked_vllm.model.a", "hooked_vllm.model.b"]]
    assert upward_imports(graph) == [
        "hooked_vllm.adapters.llava -> hooked_vllm.model.a: adapters may not import model",
        "hooked_vllm.analysis.x -> hooked_vllm: the public facade is for users, import the module",
        "hooked_vllm.analysis.x -> hooked_vllm.report.html: analysis may not import report",
    ]


def test_every_module_imports():
    """A moved name (e.g. a constant imported from where it no longer lives) fails here, by module."""
    for module in sorted(import_graph()):
        if not module.endswith("__main__"):
            importlib.import_module(module)


def test_every_stage_opens_with_a_docstring():
    for stage in (s for layer in LAYERS for s in layer):
        init = PACKAGE / stage / "__init__.py"
        path = init if init.is_file() else PACKAGE / f"{stage}.py"
        assert ast.get_docstring(ast.parse(path.read_text())), (
            f"{path} says nothing of what it takes and gives"
        )


def test_one_tiny_builder_module_per_adapter_module():
    shared = {"__init__", "base", "prompts", "tokens", "common"}
    adapters = {p.stem for p in (PACKAGE / "adapters").glob("*.py")} - shared
    builders = {p.stem for p in (PACKAGE / "tiny_models").glob("*.py")} - shared
    assert adapters == builders
