"""Run-level steps the DAG wires together: parameters -> settings, raw-window and feature
checks, the gate decision, promotion or rejection, the report. No Airflow in here: each
function takes the resolved run and returns a small JSON-able dict, so the CLI and tests
call them too. ``python -m pipeline.steps.summary --ds ... [--set ...]`` (recsys-run) prints a run's summary.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.catalog import (Catalog, configured_data_root, confine_raw_window, features_version,
                              run_data_root)
from pipeline.config import (
    ConfigError,
    PipelineConfig,
    check_gate_bounds,
    check_spark_masters,
    load_config,
    load_gate_bounds,
    overrides_from_params,
    parse_ds,
    setting_sources,
)
from pipeline.data.contract import RawWindowError
from pipeline.data.raw_files import check_raw_window
from pipeline.gate import RungResult, choose_rung, evaluate_gate
from pipeline.registry import Registry, RegistryError
from pipeline.report import write_report

log = logging.getLogger(__name__)


def nightly_ds(run_after: dt.datetime) -> str:
    """The date a run processes when no ``ds`` is given: the last UTC day complete at ``run_after``.

    A nightly run due at 02:00 UTC on 2026-11-28 processes 2026-11-27, never the day that
    has only begun. With the DAG's data-interval timetable a scheduled or backfilled run is
    due when its interval ends, so the run whose logical date (interval start) is day D
    processes D; a manual run without ``ds`` processes yesterday.

    Raises:
        ConfigError: When ``run_after`` carries no time zone (it would be read as local time).
    """
    if run_after.tzinfo is None:
        raise ConfigError(f"run_after must be time-zone aware, got {run_after!r}")
    return (run_after.astimezone(dt.timezone.utc) - dt.timedelta(days=1)).date().isoformat()


def resolve_run(params: Mapping[str, Any], run_after: dt.datetime, run_id: str,
                gate_bounds: str | Mapping[str, Any] | None = None) -> dict:
    """Turn trigger parameters into the run's settings, once, with every check.

    Args:
        params: The DAG's params (see ``dags/recsys_distillation.py``).
        run_after: When the run became due; the run processes :func:`nightly_ds` of it
            unless ``params["ds"]`` names a date.
        run_id: The Airflow run id (lineage, and the registry's record of the attempt).
        gate_bounds: The operator's Airflow Variable ``recsys_gate_bounds`` (JSON), if set;
            applied over ``$RECSYS_GATE_BOUNDS`` and the built-in bounds
            (see :func:`pipeline.config.load_gate_bounds`).

    Returns:
        ``{"ds", "data_root", "overrides", "config", "config_hash", "run_key", "run_id", "reuse_teacher",
        "gate_bounds", "features_version", "setting_sources"}``: ``config`` is every setting, fixed here for the whole
        run; ``features_version`` names the feature set of these settings and of the raw window
        as it is now (see :func:`pipeline.catalog.features_version`), which every task uses;
        ``setting_sources`` says where each setting changed from its default came from
        (param or ``config_overrides``, see :func:`pipeline.config.overrides_from_params`).

    Raises:
        ConfigError: A bad date, setting, a data root outside the configured one, gate
            settings beyond the operator's bounds, or a Spark master the operator does not allow.
    """
    ds = parse_ds(params.get("ds") or nightly_ds(run_after)).isoformat()
    allowed, data_root = configured_data_root(), run_data_root(params.get("data_root"))
    overrides = overrides_from_params(params)
    cfg = load_config(overrides)
    sources = setting_sources(params)
    for setting, source in sorted(sources.items()):
        log.info("setting %s = %r (from %s)", setting, cfg.to_dict()[setting.split(".")[0]][setting.split(".")[1]], source)
    bounds = load_gate_bounds(gate_bounds)
    check_gate_bounds(cfg, bounds)
    check_spark_masters(cfg)
    catalog = Catalog(data_root, allowed=allowed).for_run(ds, cfg)
    return {"ds": ds, "data_root": str(data_root), "overrides": overrides, "config": cfg.to_dict(), "config_hash": cfg.config_hash(),
            "run_key": run_key(ds, cfg), "run_id": run_id, "reuse_teacher": bool(params.get("reuse_teacher")),
            "gate_bounds": dataclasses.asdict(bounds), "features_version": catalog.features_version, "setting_sources": sources}


def run_key(ds: str, cfg: PipelineConfig) -> str:
    """The key of a run's records and report: its date and all its settings."""
    return f"{ds}_{cfg.config_hash()}"


def settings(run: Mapping[str, Any]) -> tuple[str, Catalog, PipelineConfig]:
    """``(ds, catalog, cfg)`` of a resolved run (what every later task starts from).

    The catalogue confines every path to the configured data root, symlinks followed:
    :func:`resolve_run` checked the run's data root, a task checks each path it uses. It
    names the run's own feature set (``features_version``), never another run's.
    """
    catalog = Catalog(Path(run["data_root"]), allowed=configured_data_root(), features_version=run.get("features_version"))
    return run["ds"], catalog, load_config(run["config"])


def open_registry(catalog: Catalog) -> Registry:
    """The run's model registry (its model directory confined to the data root too)."""
    opened = Registry(catalog.registry_root)
    catalog.confine(opened.path)
    return opened


def validate_raw(run: Mapping[str, Any]) -> dict:
    """Structural pre-flight check of the run's raw window (see :func:`pipeline.data.raw_files.check_raw_window`).

    Raises:
        OutsideDataRoot: When a partition or side table, or a file in one, resolves outside the data root.
        RawWindowError: A structural fault of the window, or a window whose files changed
            since the run was resolved (its features version would no longer name them).
    """
    ds, catalog, cfg = settings(run)
    window = cfg.features.window(dt.date.fromisoformat(ds))
    confine_raw_window(catalog.raw, *window, catalog.allowed)
    checked = check_raw_window(catalog.raw, *window, cfg.features.min_events)
    now = features_version(catalog.raw, ds, cfg)
    if run.get("features_version") and now != run["features_version"]:
        raise RawWindowError(f"the raw window ds={window[0]}..ds={window[1]} under {catalog.raw} changed since this run was "
                             f"resolved (features version {run['features_version']}, now {now}): trigger a new run to read it")
    return checked


def check_features(catalog: Catalog, ds: str) -> dict:
    """Confirm the published features passed their GX suite and every split has rows.

    Returns:
        ``{"path", "interactions_by_split", "tables"}``.

    Raises:
        ArtifactNotFound, ValueError: When the features are missing, unvalidated or empty.
    """
    path, manifest = catalog.features(ds), catalog.feature_manifest(ds)
    checks = (manifest.validation or {}).get("features")
    if not checks or not all(c.get("success") for c in checks.values()):
        raise ValueError(f"features at {path} were not validated by the GX feature suite (manifest: {checks})")
    splits = manifest.interactions_by_split
    empty = [s for s, n in splits.items() if n == 0]
    if empty:
        raise ValueError(f"features at {path} have no interactions in split(s) {empty}: too little history for a held-out evaluation")
    return {"path": str(path), "interactions_by_split": splits, "tables": manifest.table_rows}


def spark_arguments(run: Mapping[str, Any]) -> list[str]:
    """``application_args`` of the feature job for a resolved run."""
    ds, catalog, _ = settings(run)
    return ["--raw", str(catalog.raw), "--out", str(catalog.features_home), "--ds", ds, "--allowed-root", str(catalog.allowed),
            "--config-json", json.dumps({"features": run["config"]["features"]})]


# What reading a damaged registry raises: a bad champion.json (JSON, missing key), an unreadable file.
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, RegistryError)


def champion_dir(catalog: Catalog) -> str | None:
    """The registry directory of the serving champion, or None when there is none to evaluate.

    The registry is reconciled first (a champion change a crash cut short is finished), so
    the champion evaluated is the one ``models.config`` serves. An unreadable champion
    record, or one naming a version that is not published, is logged and gives None: the
    run goes on without champion metrics, and the gate rejects it because the registry is
    not empty (see :func:`champion_expected`).
    """
    registry = open_registry(catalog)
    try:
        version = registry.reconcile()
        published = registry.versions()
    except _UNREADABLE as err:
        log.warning("champion record of %s is unreadable (%s): no champion to evaluate", registry.path, err)
        return None
    if version is not None and version not in published:
        log.warning("champion record of %s names version %s, not among the published %s", registry.path, version, published)
        return None
    return str(catalog.confine(registry.path / str(version))) if version is not None else None


def champion_expected(catalog: Catalog) -> bool:
    """Whether the gate must compare the student with a champion.

    Only an empty registry (no version, no champion record) is a first run. Versions without
    a champion record, or a registry that cannot be read, expect one, so its absence rejects
    instead of being taken for a first run.
    """
    registry = open_registry(catalog)
    try:
        return bool(registry.versions()) or registry.champion() is not None
    except _UNREADABLE:
        return True


def decide(run: Mapping[str, Any], evaluation: Mapping[str, Any]) -> dict:
    """The gate's decision for the run's student ladder: every rung is gated against the
    teacher and the champion (see :func:`pipeline.gate.evaluate_gate`), and the cheapest rung
    to serve that passes is the one to promote (:func:`pipeline.gate.choose_rung`).

    Returns:
        The chosen rung's gate result, with ``student_model`` (its name in the evaluation),
        ``ladder`` (every rung: name, share, decision, reasons, users/s, parameters) and
        ``why`` (one sentence).
    """
    _, catalog, cfg = settings(run)
    models = evaluation["models"]
    champion = models.get("champion")
    expected = champion_expected(catalog)
    version = champion.get("version") if isinstance(champion, Mapping) else None
    rungs = []
    for share in cfg.ladder_rungs():
        name = cfg.rung_name(share)
        metrics = models.get(name, {})
        result = evaluate_gate(metrics, models.get("teacher", {}), champion, cfg.gate, champion_expected=expected,
                               champion_version=version)
        rungs.append(RungResult(name, share, result, metrics.get("throughput_users_per_s"), metrics.get("trainable_params")))
        for check in result.checks:
            log.info("gate %-16s %-5s %s", name, "pass" if check.passed else "FAIL", check.reason)
    chosen, why = choose_rung(rungs)
    for warning in chosen.gate.warnings:
        log.warning("gate: %s", warning)
    log.info("gate decision: %s; %s", chosen.gate.decision, why)
    ladder = [{"name": r.name, "share": r.share, "decision": r.gate.decision, "reasons": r.gate.reasons,
               "metrics": {key: models.get(r.name, {}).get(key) for key in cfg.gate.metrics},
               "users_per_s": r.users_per_s, "trainable_params": r.trainable_params} for r in rungs]
    return {**chosen.gate.to_dict(), "student_model": chosen.name, "ladder": ladder, "why": why}


def task_seconds(teacher: Mapping, students: Sequence[Mapping], evaluation: Mapping) -> dict:
    """Wall seconds of the run's steps, for the trend across nights: ``teacher`` (0 when an
    exported one was reused), ``soft_targets``, ``students`` (each rung by name) and ``evaluate``;
    None where a step did not say."""
    targets = [s["soft_targets_seconds"] for s in students if s.get("soft_targets_seconds") is not None]
    return {"teacher": 0.0 if teacher.get("reused") else teacher.get("seconds"), "soft_targets": targets[0] if targets else None,
            "students": {str(s.get("name")): s.get("seconds") for s in students}, "evaluate": evaluation.get("seconds")}


def _lineage(run: Mapping[str, Any], teacher: Mapping, student: Mapping, evaluation: Mapping, gate: Mapping) -> dict:
    ds, catalog, _ = settings(run)
    return {
        "run_key": run["run_key"], "ds": ds, "run_id": run["run_id"], "config_hash": run["config_hash"],
        "config_overrides": run["overrides"], "teacher_version": teacher["version"], "teacher_path": teacher["path"],
        "student_path": student["path"], "features": str(catalog.features(ds)),
        "soft_targets": student.get("soft_targets"),
        "metrics": evaluation["models"].get(gate.get("student_model", "student_kd"), {}), "ladder": gate.get("ladder"),
        "teacher_metrics": evaluation["models"].get("teacher", {}), "decision": gate["decision"], "reasons": gate["reasons"],
        # For the report's trend across nights (pipeline.trend).
        "champion_metrics": evaluation["models"].get("champion"), "student_model": gate.get("student_model", "student_kd"),
        "seconds": {"teacher": teacher.get("seconds"), "student": student.get("seconds"), **(evaluation.get("task_seconds") or {})},
        "warm_start": {"teacher": teacher.get("warm_start"), "student": student.get("warm_start")},
    }


def promote(run: Mapping[str, Any], teacher: Mapping, student: Mapping, evaluation: Mapping, gate: Mapping) -> dict:
    """Publish a BLESSED student as the next registry version and make it the champion, if
    the champion is still the one the gate compared it with.

    A re-run of a run already published adds no version and leaves the champion as it is;
    a champion moved since the evaluation (another run, a backfill beside the nightly run, a
    rollback) refuses the promotion (see :meth:`pipeline.registry.Registry.promote`). Every
    attempt is recorded all the same, a refused one with ``promoted: false`` and the reason.

    Returns:
        ``{"version", "registry", "champion", "rerun", "promoted", "reason"}``.

    Raises:
        ValueError: If the gate did not bless the student, or does not name the champion
            it compared the student with (promotion fails closed).
    """
    if not gate.get("blessed"):
        raise ValueError(f"refusing to promote a student the gate did not bless: {gate.get('reasons')}")
    if "champion_version" not in gate:
        raise ValueError("refusing to promote: the gate result does not name the champion the student was compared with")
    _, catalog, _ = settings(run)
    registry = open_registry(catalog)
    lineage = _lineage(run, teacher, student, evaluation, gate)
    promotion = registry.promote(catalog.confine_tree(Path(student["path"]) / "saved_model"), lineage,
                                 expected_champion=gate["champion_version"])
    record = {**lineage, "version": promotion.version, "rerun": promotion.rerun, "promoted": promotion.promoted}
    registry.record_run({**record, "reasons": [promotion.reason]} if not promotion.promoted else record)
    if not promotion.promoted:
        log.warning("NOT PROMOTED: %s; champion stays %s", promotion.reason, promotion.champion)
    elif promotion.rerun:
        log.warning("re-run of %s: version %d was published before; champion left at %s",
                    run["run_key"], promotion.version, promotion.champion)
    else:
        log.info("promoted %s as %s version %d (champion)", student["path"], registry.model, promotion.version)
    return {"version": promotion.version, "registry": str(registry.path), "champion": promotion.champion,
            "rerun": promotion.rerun, "promoted": promotion.promoted, "reason": promotion.reason}


def record_rejection(run: Mapping[str, Any], teacher: Mapping, student: Mapping, evaluation: Mapping, gate: Mapping) -> dict:
    """Record a NOT_BLESSED run with the gate's reasons; the champion stays as it is."""
    _, catalog, _ = settings(run)
    registry = open_registry(catalog)
    registry.record_run(_lineage(run, teacher, student, evaluation, gate))
    for reason in gate["reasons"]:
        log.warning("student NOT_BLESSED: %s", reason)
    log.warning("champion unchanged: %s", registry.champion())
    return {"decision": gate["decision"], "reasons": gate["reasons"], "champion": registry.champion(), "registry": str(registry.path)}


def write_run_report(run: Mapping[str, Any], teacher: Mapping, student: Mapping, evaluation: Mapping,
                     gate: Mapping, promotion: Mapping | None) -> dict:
    """The run's HTML and Markdown report in the catalogue's report directory."""
    ds, catalog, _ = settings(run)
    student_name = student.get("name", "student_kd")  # the rung the gate chose
    paths = {name: catalog.confine(model["path"]) for name, model in (("teacher", teacher), (student_name, student))}
    metadata = {name: catalog.model_metadata(path) for name, path in paths.items()}
    histories = {name: meta.history for name, meta in metadata.items()}
    # Each model's TensorBoard logs, recorded relative to its directory (none in models exported before them).
    tensorboard = {name: str(catalog.confine(paths[name] / meta.tensorboard))
                   for name, meta in metadata.items() if meta.tensorboard}
    info = {"ds": ds, "run_id": run["run_id"], "run_key": run["run_key"], "config_hash": run["config_hash"],
            "teacher_version": teacher["version"], "student": student["path"],
            "settings changed": "; ".join(f"{k} from {v}" for k, v in sorted(run.get("setting_sources", {}).items())) or "none",
            # Where each model started: last night's model (warm) or random weights (cold, and why).
            **{f"{name} start": _start(meta.warm_start) for name, meta in metadata.items()}}
    out = write_report(catalog.report(ds, run["run_key"], run["run_id"]), info, dict(evaluation), dict(gate), histories,
                       dict(promotion) if promotion else None, tensorboard=tensorboard, trend=open_registry(catalog).runs())
    log.info("report: %s", out["html"])
    return out


def _start(record: Mapping | None) -> str:
    """Where a model started, for the report: ``warm from V (ds D)``, with a phase that started
    cold named (a selection run whose last night kept no selection weights), or ``cold: why``."""
    if not record:
        return "cold"
    if "version" not in record:
        return f"cold: {record.get('cold')}"
    cold = [f"{phase} run {how}" for phase, how in (record.get("phases") or {}).items() if how.startswith("cold")]
    shrunk = f", its weights shrunk to keep {record['keep']:g}" if "keep" in record else ""
    return f"warm from {record['version']} (ds {record['ds']}){shrunk}" + "".join(f"; {c}" for c in cold)
