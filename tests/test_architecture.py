"""The shape of the code: imports point one way, paths are named in one place, modules stay small.

The layering rule, by package (checked for every module on disk, new ones included):

* ``pipeline.steps`` (what the DAG, the CLIs, the benchmarks and the tests call) is imported
  only by ``pipeline.steps`` itself, ``dags/``, ``bench/``, ``tests/`` and CLI ``__main__``
  modules; so ``pipeline.modeling``, ``pipeline.soft_targets``, ``pipeline.evaluation``,
  ``pipeline.data``, ``pipeline.config``, ``pipeline.catalog``, ``pipeline.io``,
  ``pipeline.registry``, ``pipeline.gate`` and the rest of ``pipeline`` never import a step.
* Within ``pipeline``, layers from the top: ``steps``, then ``soft_targets``, then
  ``modeling``, then the foundation (every other module: config, catalog, io, spark, cli,
  data, evaluation, gate, registry, report). A module imports its own layer and the layers
  below it, never one above.
* ``pipeline`` never imports Airflow, ``spark_jobs``, ``deploy``, ``dags``, ``plugins``,
  ``bench`` or ``tests``: every step runs with ``python -m``.
* ``spark_jobs`` imports only the foundation of ``pipeline`` (never a step, the model code
  or the soft targets) and never Airflow or ``deploy``.
* ``deploy`` (the services tooling) never imports a step, the model code or the soft targets.
* No module imports a test module (``tests.test_*``): tests share code through
  ``tests.helpers``, ``tests.rawlogs`` and the fixtures of ``tests/conftest.py``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "spark_jobs")  # the library: small modules, no import cycle
SOURCES = ("pipeline", "spark_jobs", "deploy", "dags", "plugins", "bench", "tests")  # every module the rules check
MAX_MODULE_LINES = 350

# Within pipeline/, from the top; a module belongs to the first layer whose prefix it has.
PIPELINE_LAYERS = ("pipeline.steps", "pipeline.soft_targets", "pipeline.modeling", "pipeline")
STEP_IMPORTERS = ("pipeline.steps", "dags", "bench", "tests")  # and any CLI __main__
NOT_THE_FOUNDATION = ("pipeline.steps", "pipeline.soft_targets", "pipeline.modeling")
NEVER_IMPORTS = {
    "pipeline": ("airflow", "spark_jobs", "deploy", "dags", "plugins", "bench", "tests"),
    "spark_jobs": NOT_THE_FOUNDATION + ("airflow", "deploy", "dags", "plugins", "bench", "tests"),
    "deploy": NOT_THE_FOUNDATION + ("dags", "plugins", "bench", "tests"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(folders: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    return {module_name(p): p for folder in folders for p in (REPO / folder).rglob("*.py")}


def within(name: str, prefixes: tuple[str, ...] | str) -> bool:
    """Whether the dotted ``name`` is one of ``prefixes`` or inside one of them."""
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == prefix or name.startswith(f"{prefix}.") for prefix in prefixes)


def imported_names(path: Path) -> set[str]:
    """Every dotted name ``path`` imports, at top level or inside a function (lazy imports count).

    ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (``c`` may be a module); relative
    imports are resolved against ``path``'s package.
    """
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every project module (of ``modules``) that ``path`` imports."""
    found = set()
    for name in imported_names(path):
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


def pipeline_layer(name: str) -> int:
    """0 for the steps, growing downwards to the foundation."""
    return next(i for i, prefix in enumerate(PIPELINE_LAYERS) if within(name, prefix))


def enclosing_test_module(name: str) -> str | None:
    """The test module (``tests.test_*``) that the dotted ``name`` is or lies inside, or None."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 and parts[0] == "tests" and parts[1].startswith("test_") else None


def layering_violations(imports: dict[str, set[str]]) -> list[str]:
    """Every import in ``imports`` (module -> the dotted names it imports) that breaks the layering rule."""
    found = []
    for module, names in sorted(imports.items()):
        for test_module in sorted({enclosing_test_module(name) for name in names} - {None, module}):
            found.append(f"{module} imports the test module {test_module}: shared test code lives in tests.helpers")
        for name in sorted(names):
            if within(name, "pipeline.steps") and not within(module, STEP_IMPORTERS) and not module.endswith("__main__"):
                found.append(f"{module} imports the step {name}: only {', '.join(STEP_IMPORTERS)} and CLI __main__s may")
            if within(module, "pipeline") and within(name, "pipeline") and pipeline_layer(name) < pipeline_layer(module):
                found.append(f"{module} imports {name}, a layer above it ({' > '.join(PIPELINE_LAYERS)})")
            for package, forbidden in NEVER_IMPORTS.items():
                if within(module, package) and within(name, forbidden):
                    found.append(f"{module} imports {name}: {package} never imports {', '.join(forbidden)}")
    return found


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_pipeline_has_no_import_cycle():
    graph = import_graph()
    assert "pipeline.catalog" in graph and graph["pipeline.steps.chain"] >= {"pipeline.steps.train_teacher", "pipeline.steps.distill"}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_layering_rule_names_each_kind_of_violation():
    assert layering_violations({
        "pipeline.modeling.models": {"pipeline.steps.distill"},  # a lower layer importing a step
        "pipeline.modeling.training": {"pipeline.soft_targets.rows", "pipeline.config"},  # a layer above
        "pipeline.io": {"airflow.sdk", "spark_jobs.validation"},  # orchestration and the Spark job
        "spark_jobs.extract_features": {"pipeline.modeling.models", "pipeline.catalog"},
        "deploy.services": {"pipeline.steps.run"},
        "pipeline.steps.run": {"pipeline.steps.evaluate", "pipeline.modeling.models"},  # allowed
        "pipeline.registry.__main__": {"pipeline.registry.cli"},  # allowed
        "dags.recsys_distillation": {"pipeline.steps.run", "airflow.sdk"},  # allowed
        "tests.test_dag": {"pipeline.steps.run"},  # allowed
        "tests.test_catalog": {"tests.test_registry", "tests.test_registry.saved_model", "tests.helpers"},
        "tests.test_registry": {"tests.helpers", "tests.helpers.saved_model", "tests.rawlogs"},  # allowed
    }) == [
        "deploy.services imports the step pipeline.steps.run: only pipeline.steps, dags, bench, tests and CLI __main__s may",
        "deploy.services imports pipeline.steps.run: deploy never imports pipeline.steps, pipeline.soft_targets, pipeline.modeling, "
        "dags, plugins, bench, tests",
        "pipeline.io imports airflow.sdk: pipeline never imports airflow, spark_jobs, deploy, dags, plugins, bench, tests",
        "pipeline.io imports spark_jobs.validation: pipeline never imports airflow, spark_jobs, deploy, dags, plugins, bench, tests",
        "pipeline.modeling.models imports the step pipeline.steps.distill: only pipeline.steps, dags, bench, tests and CLI __main__s may",
        "pipeline.modeling.models imports pipeline.steps.distill, a layer above it "
        "(pipeline.steps > pipeline.soft_targets > pipeline.modeling > pipeline)",
        "pipeline.modeling.training imports pipeline.soft_targets.rows, a layer above it "
        "(pipeline.steps > pipeline.soft_targets > pipeline.modeling > pipeline)",
        "spark_jobs.extract_features imports pipeline.modeling.models: spark_jobs never imports pipeline.steps, "
        "pipeline.soft_targets, pipeline.modeling, airflow, deploy, dags, plugins, bench, tests",
        "tests.test_catalog imports the test module tests.test_registry: shared test code lives in tests.helpers",
    ]


def test_every_module_keeps_to_the_layering_rule():
    modules = project_modules(SOURCES)
    assert {"pipeline.steps.run", "pipeline.modeling.models", "spark_jobs.validation", "dags.recsys_distillation",
            "plugins.recsys_reports", "deploy.services", "bench.quality"} <= set(modules)
    imports = {name: imported_names(path) for name, path in modules.items()}
    assert "pipeline.steps.run" in imports["dags.recsys_distillation"]  # lazy imports, inside the tasks, are seen
    assert layering_violations(imports) == []


def test_only_the_catalogue_and_the_contract_name_date_partitions():
    pattern = re.compile(r'f"ds=')
    files = [p for folder in ("pipeline", "spark_jobs", "dags", "bench") for p in (REPO / folder).rglob("*.py")]
    naming = sorted(str(p.relative_to(REPO)) for p in files if pattern.search(p.read_text()))
    assert set(naming) <= {"pipeline/catalog.py", "pipeline/data/contract.py"}, naming


def test_modules_stay_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in project_modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}
