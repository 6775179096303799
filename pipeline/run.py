"""Run-level steps the DAG wires together: parameters -> config, raw-window and feature
checks, the gate decision, promotion or rejection. No Airflow in here: each function takes
paths and settings and returns a small JSON-able dict, so the CLI and tests call them too.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ConfigError, DataPaths, PipelineConfig, load_config, parse_ds
from pipeline.data.contract import EVENT_SCHEMA
from pipeline.features import feature_partition, read_manifest

log = logging.getLogger(__name__)

DATA_ROOT_ENV = "RECSYS_DATA_ROOT"
REPO_ROOT = Path(__file__).resolve().parents[1]


class RawWindowError(ValueError):
    """The raw window cannot be processed (checked before any Spark is started)."""


def configured_data_root() -> Path:
    """The data root every run must stay inside: ``$RECSYS_DATA_ROOT`` or ``<repo>/data``."""
    return Path(os.environ.get(DATA_ROOT_ENV) or REPO_ROOT / "data").resolve()


def resolve_run(params: Mapping[str, Any], logical_ds: str, run_id: str) -> dict:
    """Turn trigger parameters into the run's settings, once, with every check.

    Args:
        params: The DAG's params (see ``dags/recsys_distillation.py``).
        logical_ds: The run's logical date (used when ``params["ds"]`` is empty).
        run_id: The Airflow run id (lineage only).

    Returns:
        ``{"ds", "data_root", "overrides", "config_hash", "run_key", "run_id", "reuse_teacher"}``.

    Raises:
        ConfigError: A bad date, setting, or a data root outside the configured one.
    """
    ds = parse_ds(params.get("ds") or logical_ds).isoformat()
    allowed = configured_data_root()
    data_root = Path(params.get("data_root") or allowed)
    data_root = (data_root if data_root.is_absolute() else allowed / data_root).resolve()
    if data_root != allowed and allowed not in data_root.parents:
        raise ConfigError(f"data_root {params.get('data_root')!r} resolves to {data_root}, outside the configured data root {allowed} (${DATA_ROOT_ENV})")
    overrides: dict[str, Any] = {section: dict(values) for section, values in (params.get("config_overrides") or {}).items()}
    train = overrides.setdefault("train", {})
    for key in ("teacher_epochs", "student_epochs", "temperature", "alpha", "beta"):
        if params.get(key) is not None:
            train[key] = params[key]
    if params.get("window_days") is not None:
        overrides.setdefault("features", {})["window_days"] = params["window_days"]
    gate = overrides.setdefault("gate", {})
    for key in ("min_change_vs_teacher", "min_change_vs_champion"):
        if params.get(key) is not None:
            gate[key] = params[key]
    cfg = load_config(overrides)
    return {"ds": ds, "data_root": str(data_root), "overrides": overrides, "config_hash": cfg.config_hash(),
            "run_key": f"{ds}_{cfg.config_hash()}", "run_id": run_id, "reuse_teacher": bool(params.get("reuse_teacher"))}


def settings(run: Mapping[str, Any]) -> tuple[str, DataPaths, PipelineConfig]:
    """``(ds, paths, cfg)`` of a resolved run (what every later task starts from)."""
    return run["ds"], DataPaths(Path(run["data_root"])), load_config(run["overrides"])


def check_raw_window(raw_root: str | Path, ds: str, cfg: PipelineConfig) -> dict:
    """Cheap structural checks of the raw window from Parquet footers alone (no Spark).

    Every partition file must open as Parquet and hold the contract's columns with their
    types; the window must hold at least ``features.min_events`` rows. Row-level checks
    (nulls, event types, duplicates) run in the Spark job's GX suite.

    Returns:
        ``{"partitions", "files", "rows"}``.

    Raises:
        RawWindowError: Naming the file or column at fault.
    """
    start, end = cfg.features.window(dt.date.fromisoformat(ds))
    days = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    partitions = [Path(raw_root) / "events" / f"ds={d}" for d in days if (Path(raw_root) / "events" / f"ds={d}").is_dir()]
    if not partitions:
        raise RawWindowError(f"empty window: no event partitions ds={start}..ds={end} under {Path(raw_root) / 'events'}")
    files, rows = 0, 0
    for partition in partitions:
        for path in sorted(partition.glob("*.parquet")):
            try:
                meta = pq.read_metadata(path)
                schema = pq.read_schema(path)
            except (pa.ArrowInvalid, OSError) as err:
                raise RawWindowError(f"corrupt Parquet file {path}: {err}") from err
            missing = [f.name for f in EVENT_SCHEMA if f.name not in schema.names]
            if missing:
                raise RawWindowError(f"{path} lacks column(s) {missing}")
            wrong = [f"{f.name} is {schema.field(f.name).type}, expected {f.type}" for f in EVENT_SCHEMA
                     if not _compatible(schema.field(f.name).type, f.type)]
            if wrong:
                raise RawWindowError(f"{path}: " + "; ".join(wrong))
            files += 1
            rows += meta.num_rows
    if rows < cfg.features.min_events:
        raise RawWindowError(f"empty window: {rows} event(s) in ds={start}..ds={end}, need >= {cfg.features.min_events}")
    log.info("raw window ds=%s..ds=%s: %d partitions, %d files, %d rows", start, end, len(partitions), files, rows)
    return {"partitions": len(partitions), "files": files, "rows": rows}


def _compatible(found: pa.DataType, wanted: pa.DataType) -> bool:
    if pa.types.is_timestamp(wanted):
        return pa.types.is_timestamp(found) and found.tz is not None
    if pa.types.is_floating(wanted):
        return pa.types.is_floating(found)
    if pa.types.is_string(wanted):
        return pa.types.is_string(found) or pa.types.is_large_string(found)
    return found == wanted


def check_features(features_root: str | Path, ds: str) -> dict:
    """Confirm the published features passed their GX suite and every split has rows.

    Returns:
        ``{"path", "interactions_by_split", "tables"}``.

    Raises:
        FileNotFoundError, ValueError: When the features are missing, unvalidated or empty.
    """
    path = feature_partition(features_root, ds)
    manifest = read_manifest(path)
    checks = manifest.get("validation", {}).get("features")
    if not checks or not all(c.get("success") for c in checks.values()):
        raise ValueError(f"features at {path} were not validated by the GX feature suite (manifest: {checks})")
    splits = manifest["counts"]["interactions_by_split"]
    empty = [s for s, n in splits.items() if n == 0]
    if empty:
        raise ValueError(f"features at {path} have no interactions in split(s) {empty}: too little history for a held-out evaluation")
    return {"path": str(path), "interactions_by_split": splits, "tables": {n: t["rows"] for n, t in manifest["tables"].items()}}


def spark_arguments(run: Mapping[str, Any]) -> list[str]:
    """``application_args`` of the feature job for a resolved run."""
    import json

    ds, paths, _ = settings(run)
    return ["--raw", str(paths.raw), "--out", str(paths.features), "--ds", ds,
            "--config-json", json.dumps({"features": run["overrides"].get("features", {})})]


def champion_dir(paths: DataPaths) -> str | None:
    """The registry directory of the serving champion, if there is one."""
    from pipeline.registry import Registry

    registry = Registry(paths.registry)
    version = registry.champion()
    return str(registry.path / str(version)) if version is not None else None


def decide(run: Mapping[str, Any], evaluation: Mapping[str, Any]) -> dict:
    """The gate's decision for the run's distilled student (see :func:`pipeline.gate.evaluate_gate`)."""
    from pipeline.gate import evaluate_gate

    _, _, cfg = settings(run)
    models = evaluation["models"]
    result = evaluate_gate(models.get("student_kd", {}), models.get("teacher", {}), models.get("champion"), cfg.gate)
    for warning in result.warnings:
        log.warning("gate: %s", warning)
    for check in result.checks:
        log.info("gate %-8s %s", "pass" if check.passed else "FAIL", check.reason)
    log.info("gate decision: %s", result.decision)
    return result.to_dict()


def _lineage(run: Mapping[str, Any], teacher: Mapping, student: Mapping, evaluation: Mapping, gate: Mapping) -> dict:
    ds, paths, _ = settings(run)
    return {
        "run_key": run["run_key"], "ds": ds, "run_id": run["run_id"], "config_hash": run["config_hash"],
        "config_overrides": run["overrides"], "teacher_version": teacher["version"], "teacher_path": teacher["path"],
        "student_path": student["path"], "features_manifest": str(paths.features / f"ds={ds}" / "manifest.json"),
        "soft_targets": student.get("soft_targets"), "metrics": evaluation["models"].get("student_kd", {}),
        "teacher_metrics": evaluation["models"].get("teacher", {}), "decision": gate["decision"], "reasons": gate["reasons"],
    }


def promote(run: Mapping[str, Any], teacher: Mapping, student: Mapping, evaluation: Mapping, gate: Mapping) -> dict:
    """Publish a BLESSED student as the next registry version and make it the champion.

    Raises:
        ValueError: If the gate did not bless the student (promotion fails closed).
    """
    from pipeline.registry import Registry

    if not gate.get("blessed"):
        raise ValueError(f"refusing to promote a student the gate did not bless: {gate.get('reasons')}")
    _, paths, _ = settings(run)
    registry = Registry(paths.registry)
    lineage = _lineage(run, teacher, student, evaluation, gate)
    version = registry.promote(Path(student["path"]) / "saved_model", lineage)
    registry.record_run(run["run_key"], {**lineage, "version": version})
    log.info("promoted %s as %s version %d (champion)", student["path"], registry.model, version)
    return {"version": version, "registry": str(registry.path), "champion": registry.champion()}


def record_rejection(run: Mapping[str, Any], teacher: Mapping, student: Mapping, evaluation: Mapping, gate: Mapping) -> dict:
    """Record a NOT_BLESSED run with the gate's reasons; the champion stays as it is."""
    from pipeline.registry import Registry

    _, paths, _ = settings(run)
    registry = Registry(paths.registry)
    registry.record_run(run["run_key"], _lineage(run, teacher, student, evaluation, gate))
    for reason in gate["reasons"]:
        log.warning("student NOT_BLESSED: %s", reason)
    log.warning("champion unchanged: %s", registry.champion())
    return {"decision": gate["decision"], "reasons": gate["reasons"], "champion": registry.champion(), "registry": str(registry.path)}


def write_run_report(run: Mapping[str, Any], teacher: Mapping, student: Mapping, evaluation: Mapping,
                     gate: Mapping, promotion: Mapping | None) -> dict:
    """The run's HTML and Markdown report under ``<data>/reports/ds=<ds>/<run_key>/``."""
    import json

    from pipeline.report import write_report

    ds, paths, _ = settings(run)
    histories = {}
    for name, model in (("teacher", teacher), ("student_kd", student)):
        meta = Path(model["path"]) / "metadata.json"
        histories[name] = json.loads(meta.read_text())["history"] if meta.is_file() else []
    info = {"ds": ds, "run_id": run["run_id"], "run_key": run["run_key"], "config_hash": run["config_hash"],
            "teacher_version": teacher["version"], "student": student["path"]}
    out = write_report(paths.reports / f"ds={ds}" / run["run_key"], info, dict(evaluation), dict(gate), histories,
                       dict(promotion) if promotion else None)
    log.info("report: %s", out["html"])
    return out


def latest_summary(data_root: str | Path, ds: str) -> dict:
    """The newest run report's inputs for ``ds`` (metrics, gate decision, paths)."""
    import json

    reports = sorted((Path(data_root) / "reports" / f"ds={ds}").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    if not reports:
        raise FileNotFoundError(f"no run report for ds={ds} under {Path(data_root) / 'reports'}")
    return {**json.loads(reports[-1].read_text()), "report_dir": str(reports[-1].parent)}


def main(argv=None) -> int:
    """Print the latest run of a ``ds``: metrics table, gate decision, report and registry."""
    import argparse

    from pipeline.evaluate import format_table
    from pipeline.registry import Registry

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--ds", required=True)
    args = parser.parse_args(argv)
    summary = latest_summary(args.data_root, args.ds)
    gate = summary["gate"]
    registry = Registry(Path(args.data_root) / "registry")
    print(f"\nrun {summary['run']['run_key']}  (ds={args.ds})\n")
    manifest = read_manifest(Path(args.data_root) / "features" / f"ds={args.ds}")
    print("features: " + ", ".join(f"{name} {table['rows']:,}" for name, table in manifest["tables"].items()))
    print("events:   " + ", ".join(f"{k} {v:,}" for k, v in manifest["counts"].items() if isinstance(v, int)))
    print("splits:   " + ", ".join(f"{k} {v:,}" for k, v in manifest["counts"]["interactions_by_split"].items()) + "\n")
    print(format_table(summary["evaluation"]["models"]))
    print(f"\ngate: {gate['decision']}")
    for line in gate["reasons"] + [f"warning: {w}" for w in gate["warnings"]]:
        print(f"  - {line}")
    print(f"report:   {Path(summary['report_dir']) / 'report.html'}")
    print(f"registry: {registry.path} (versions {registry.versions()}, champion {registry.champion()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
