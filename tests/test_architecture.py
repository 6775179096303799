"""The shape of the code: imports point one way, paths are named in one place, modules stay small."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "spark_jobs")
MAX_MODULE_LINES = 350


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every project module ``path`` imports, at top level or inside a function (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline import cli` imports the module pipeline.cli; `from a.b import f` imports a.b.
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    # A package's __init__ importing its own submodules is how it re-exports them, not a cycle.
    return {name: {m for m in imports_of(path, set(modules)) if m != name and not name.startswith(f"{m}.")}
            for name, path in modules.items()}


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_pipeline_has_no_import_cycle():
    graph = import_graph()
    assert "pipeline.catalog" in graph and graph["pipeline.chain"] >= {"pipeline.train_teacher", "pipeline.distill"}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_lower_layers_never_import_a_step():
    steps = {"pipeline.train_teacher", "pipeline.soft_targets", "pipeline.distill", "pipeline.evaluate", "pipeline.chain", "pipeline.run"}
    lower = ("pipeline.catalog", "pipeline.config", "pipeline.data", "pipeline.features", "pipeline.models", "pipeline.losses",
             "pipeline.training", "pipeline.teacher_scoring", "pipeline.evaluation", "pipeline.gate", "pipeline.registry",
             "pipeline.tf_serving", "pipeline.io", "spark_jobs")
    graph = import_graph()
    offenders = {name: sorted(graph[name] & steps) for name in graph if name.startswith(lower) and graph[name] & steps}
    assert offenders == {}


def test_only_the_catalogue_and_the_contract_name_date_partitions():
    pattern = re.compile(r'f"ds=')
    files = [p for folder in ("pipeline", "spark_jobs", "dags", "bench") for p in (REPO / folder).rglob("*.py")]
    naming = sorted(str(p.relative_to(REPO)) for p in files if pattern.search(p.read_text()))
    assert set(naming) <= {"pipeline/catalog.py", "pipeline/data/contract.py"}, naming


def test_modules_stay_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in project_modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}
