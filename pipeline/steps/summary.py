"""``recsys-run``: print a run's summary (features, metrics table, the ladder's gate decisions,
report and registry) from its recorded report; ``python -m pipeline.steps.summary``."""

from __future__ import annotations

import json
import sys

from pipeline import cli
from pipeline.records import FeatureManifest
from pipeline.steps.evaluate import format_table
from pipeline.steps.run import open_registry, run_key


def main(argv=None) -> int:
    """Print a run's summary: features, metrics table, gate decision, report and registry.

    The run is the one of ``--ds`` with the settings given (``--config``, ``--set``), i.e.
    the settings the DAG run was triggered with.
    """
    args = cli.parser(main.__doc__.splitlines()[0]).parse_args(argv)
    ds, catalog, cfg = cli.settings(args)
    key = run_key(ds, cfg)
    registry = open_registry(catalog)
    attempts = registry.runs(key)
    if not attempts:
        print(f"no run of ds={ds} with these settings has been recorded in {registry.path}", file=sys.stderr)
        return 1
    report_dir = catalog.report(ds, key, attempts[-1]["run_id"])
    if not (report_dir / "summary.json").is_file():
        print(f"the latest attempt {attempts[-1]['run_id']} has no report at {report_dir} (its report task failed?)",
              file=sys.stderr)
        return 1
    summary = json.loads((report_dir / "summary.json").read_text())
    recorded = attempts[-1].get("features")  # the feature set the run used, by its lineage
    manifest = FeatureManifest.load(catalog.confine(recorded)) if recorded else catalog.feature_manifest(ds)
    gate = summary["gate"]
    print(f"\nrun {summary['run']['run_key']}  (ds {ds}), attempt {attempts[-1]['run_id']} of {len(attempts)}\n")
    print("features: " + ", ".join(f"{name} {rows:,}" for name, rows in manifest.table_rows.items()))
    print("events:   " + ", ".join(f"{k} {v:,}" for k, v in manifest.counts.items() if isinstance(v, int)))
    print("splits:   " + ", ".join(f"{k} {v:,}" for k, v in manifest.interactions_by_split.items()) + "\n")
    print(format_table(summary["evaluation"]["models"]))
    print(f"\ngate: {gate['decision']}" + (f"  ({gate['why']})" if gate.get("why") else ""))
    for rung in gate.get("ladder") or []:
        print(f"  rung {rung['name']:16} {rung['decision']:12} " + "; ".join(rung["reasons"]))
    for line in gate["reasons"] + [f"warning: {w}" for w in gate["warnings"]]:
        print(f"  - {line}")
    print(f"report:   {report_dir / 'report.html'}")
    print(f"registry: {registry.path} (versions {registry.versions()}, champion {registry.champion()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
