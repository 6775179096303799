"""Quality and cost of teacher, distilled student and baselines on real MovieLens-100K.

Run as ``.venv/bin/python bench/quality.py [--seeds 42 43 44] [--set distill.alpha=0.5 ...]``.

From a clean checkout it converts ML-100K (shipped in the recbole wheel) into raw logs,
runs the Spark feature job once (features are deterministic), then for each seed trains
the teacher, writes soft targets, distils the student, trains the same student without
distillation (alpha=1, beta=0, same epochs and seed) -- all through
``pipeline.chain.run_chain`` -- and evaluates them all, with ALS and MostPopular, on the
same test split with ``pipeline.evaluate.evaluate_run``.
Latencies of teacher and student are measured side by side in the same process.

Writes ``bench/results/quality_ml100k.json`` (every seed, mean and spread, targets, gap
closed) and ``bench/results/quality_ml100k.md`` (the README table).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

import pipeline  # noqa: E402,F401
from pipeline import cli  # noqa: E402
from pipeline.catalog import Catalog  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.movielens import convert_movielens  # noqa: E402

log = logging.getLogger("bench.quality")
DS = "1998-04-22"
WINDOW_DAYS = 240
MODELS = ("teacher", "student_kd", "student_plain", "als", "most_popular")
METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20", "hitrate@10", "mrr", "coverage@10")
COSTS = ("trainable_params", "saved_model_bytes", "latency_ms_p50", "latency_ms_p99", "throughput_users_per_s")


def prepare_features(catalog: Catalog) -> None:
    """Raw ML-100K logs and their features (skipped when already published)."""
    try:
        catalog.features(DS)
        return
    except FileNotFoundError:
        pass
    convert_movielens(catalog.raw)
    subprocess.run([sys.executable, "-m", "spark_jobs.extract_features", "--raw", str(catalog.raw), "--out",
                    str(catalog.features_root), "--ds", DS, "--window-days", str(WINDOW_DAYS)], check=True, cwd=REPO_ROOT)


def run_seed(catalog: Catalog, cfg, seed: int) -> dict:
    from pipeline.chain import run_chain
    from pipeline.evaluate import evaluate_run, run_models

    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, seed=seed))
    started = time.perf_counter()
    chain = run_chain(DS, catalog, cfg, plain_baseline=True)
    result = evaluate_run(DS, catalog, cfg, run_models(DS, catalog, cfg, plain=True))
    result["training"] = {name: {k: chain[stage][k] for k in ("best_epoch", "epochs", "seconds")} for name, stage in
                          (("teacher", "teacher"), ("student_kd", "student"), ("student_plain", "student_plain"))}
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def summarise(runs: list[dict]) -> dict:
    """Mean and (population) standard deviation over seeds of every metric and cost."""
    summary = {}
    for model in MODELS:
        summary[model] = {}
        for key in METRICS + COSTS:
            values = [run["models"][model][key] for run in runs if key in run["models"].get(model, {})]
            if values:
                summary[model][key] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "runs": values}
    return summary


def targets(summary: dict, runs: list[dict]) -> dict:
    mean = lambda m, k: summary[m][k]["mean"]  # noqa: E731
    kd_gain = [r["models"]["student_kd"]["ndcg@10"] / r["models"]["student_plain"]["ndcg@10"] - 1 for r in runs]
    spread = max(summary["student_kd"]["ndcg@10"]["std"], summary["student_plain"]["ndcg@10"]["std"])
    gap = {k: (mean("student_kd", k) - mean("student_plain", k)) / (mean("teacher", k) - mean("student_plain", k))
           if mean("teacher", k) != mean("student_plain", k) else float("nan") for k in ("ndcg@10", "recall@20")}
    return {
        "student_params_share_of_teacher": {"value": mean("student_kd", "trainable_params") / mean("teacher", "trainable_params"), "target": "<= 0.10"},
        "kd_ndcg@10_retention": {"value": mean("student_kd", "ndcg@10") / mean("teacher", "ndcg@10"), "target": ">= 0.95"},
        "kd_recall@20_retention": {"value": mean("student_kd", "recall@20") / mean("teacher", "recall@20"), "target": ">= 0.95"},
        "kd_vs_plain_ndcg@10_relative_gain": {"value": statistics.fmean(kd_gain), "per_seed": kd_gain, "target": ">= 0.05"},
        "kd_vs_plain_ndcg@10_diff_vs_seed_spread": {"diff": mean("student_kd", "ndcg@10") - mean("student_plain", "ndcg@10"),
                                                    "spread": spread, "target": "diff > spread"},
        "teacher_beats_als_ndcg@10": {"value": mean("teacher", "ndcg@10") > mean("als", "ndcg@10")},
        "teacher_beats_most_popular_ndcg@10": {"value": mean("teacher", "ndcg@10") > mean("most_popular", "ndcg@10")},
        "student_throughput_vs_teacher": {"value": mean("student_kd", "throughput_users_per_s") / mean("teacher", "throughput_users_per_s"), "target": ">= 5"},
        "gap_closed": {**gap, "meaning": "(KD student - plain student) / (teacher - plain student)"},
    }


def markdown(summary: dict, checks: dict, seeds: list[int]) -> str:
    fmt = lambda m, k, d=4: f"{summary[m][k]['mean']:.{d}f} ± {summary[m][k]['std']:.{d}f}" if k in summary[m] else "–"  # noqa: E731
    lines = [f"ML-100K test split, mean ± std over seeds {seeds} (`bench/quality.py`).", "",
             "| model | NDCG@10 | Recall@20 | Recall@10 | NDCG@20 | HitRate@10 | MRR | coverage@10 | params | SavedModel MB | p50 ms | p99 ms | users/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in MODELS:
        cost = lambda k, d: f"{summary[m][k]['mean']:.{d}f}" if k in summary[m] else "–"  # noqa: E731
        mb = f"{summary[m]['saved_model_bytes']['mean'] / 1e6:.2f}" if "saved_model_bytes" in summary[m] else "–"
        params = f"{summary[m]['trainable_params']['mean']:,.0f}" if "trainable_params" in summary[m] else "–"
        lines.append(f"| {m} | {fmt(m, 'ndcg@10')} | {fmt(m, 'recall@20')} | {fmt(m, 'recall@10')} | {fmt(m, 'ndcg@20')} | "
                     f"{fmt(m, 'hitrate@10')} | {fmt(m, 'mrr')} | {fmt(m, 'coverage@10', 3)} | {params} | {mb} | "
                     f"{cost('latency_ms_p50', 1)} | {cost('latency_ms_p99', 1)} | {cost('throughput_users_per_s', 0)} |")
    lines += ["", "| target | measured | wanted |", "|---|---|---|"]
    for name, check in checks.items():
        if name == "gap_closed":
            lines.append(f"| gap closed (NDCG@10 / Recall@20) | {check['ndcg@10']:.2f} / {check['recall@20']:.2f} | report |")
        elif "value" in check:
            value = check["value"]
            lines.append(f"| {name} | {value if isinstance(value, bool) else f'{value:.3f}'} | {check.get('target', 'true')} |")
        else:
            lines.append(f"| {name} | {check['diff']:.4f} vs {check['spread']:.4f} | {check['target']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--data-root", default=str(REPO_ROOT / "bench" / "work" / "quality"))
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "quality_ml100k"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON")
    args = parser.parse_args(argv)
    cfg = load_config(cli.overrides(args.set))
    catalog = Catalog(Path(args.data_root))
    prepare_features(catalog)
    runs = []
    for seed in args.seeds:
        runs.append({"seed": seed, **run_seed(catalog, cfg, seed)})
        log.info("seed %d done in %.0fs", seed, runs[-1]["seconds"])
    summary = summarise(runs)
    checks = targets(summary, runs)
    import tensorflow as tf
    payload = {"date": dt.date.today().isoformat(), "dataset": "MovieLens-100K (recbole 1.2.1 wheel)", "ds": DS,
               "seeds": args.seeds, "overrides": args.set, "config": cfg.to_dict(),
               "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(), "tensorflow": tf.__version__},
               "summary": summary, "targets": checks, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    table = markdown(summary, checks, args.seeds)
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
