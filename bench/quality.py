"""Quality and cost of teacher, distilled student and baselines, over paired seeds.

Run as ``.venv/bin/python bench/quality.py [--dataset ml100k|synthetic] [--seeds 42 43 44 45 46]
[--set distill.alpha=0.5 ...]``.

From a clean checkout it writes the data set's raw logs (ML-100K from the recbole wheel,
or a synthetic log of another shape), runs the Spark feature job once (features are
deterministic), then for each seed trains the teacher, writes soft targets, distils the
student and trains the same student without distillation (alpha=1, beta=0, same epochs)
through ``pipeline.steps.chain.run_chain``, and evaluates them all, with ALS and MostPopular, on
the same test split with ``pipeline.steps.evaluate.evaluate_run``. Teacher, KD student and
plain student share seed, features and split, so per-seed differences are paired.

Writes ``bench/results/quality_<dataset>.json`` (every seed, mean and spread, paired
differences and tests, targets) and ``.md`` (the README tables).
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

from pipeline import cli
from pipeline.catalog import Catalog
from pipeline.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench.quality")
# Data set -> the date its window ends on, the window, and how its raw logs are written.
DATASETS = {
    "ml100k": {"ds": "1998-04-22", "window_days": 240, "label": "MovieLens-100K (recbole 1.2.1 wheel)"},
    "synthetic": {"ds": "2024-01-31", "window_days": 30, "label": "synthetic, 20k users x 10k items, 400k events",
                  "shape": {"users": 20_000, "items": 10_000, "days": 30, "events": 400_000, "seed": 7}},
}
DS = DATASETS["ml100k"]["ds"]  # the ML-100K date, for the other ML-100K benchmarks
MODELS = ("teacher", "student_kd", "student_plain", "als", "als_refit", "most_popular")
METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20", "hitrate@10", "mrr", "coverage@10")
COSTS = ("trainable_params", "saved_model_bytes", "latency_ms_p50", "latency_ms_p99", "throughput_users_per_s")


def prepare_features(catalog: Catalog, dataset: str = "ml100k") -> None:
    """The data set's raw logs and features (skipped when already published)."""
    spec = DATASETS[dataset]
    try:
        catalog.features(spec["ds"])
        return
    except FileNotFoundError:
        pass
    if dataset == "ml100k":
        from pipeline.data.movielens import convert_movielens

        convert_movielens(catalog.raw)
    else:
        from pipeline.data.synthetic import generate_synthetic_logs

        generate_synthetic_logs(catalog.raw, **spec["shape"], end_date=spec["ds"])
    subprocess.run([sys.executable, "-m", "spark_jobs.extract_features", "--raw", str(catalog.raw), "--out",
                    str(catalog.features_root), "--ds", spec["ds"], "--window-days", str(spec["window_days"])],
                   check=True, cwd=REPO_ROOT)


def run_seed(catalog: Catalog, ds: str, cfg, seed: int) -> dict:
    """Teacher, KD student, plain student, ALS and MostPopular of one seed on one test split."""
    from pipeline.steps.chain import run_chain
    from pipeline.steps.evaluate import evaluate_run, run_models

    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, seed=seed))
    started = time.perf_counter()
    chain = run_chain(ds, catalog, cfg, plain_baseline=True)
    result = evaluate_run(ds, catalog, cfg, run_models(ds, catalog, cfg, plain=True))
    result["training"] = {name: {k: chain[stage][k] for k in ("best_epoch", "epochs", "seconds")} for name, stage in
                          (("teacher", "teacher"), ("student_kd", "student"), ("student_plain", "student_plain"))}
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def summarise(runs: list[dict]) -> dict:
    """Mean and (sample) standard deviation over seeds of every metric and cost."""
    summary = {}
    for model in MODELS:
        summary[model] = {}
        for key in METRICS + COSTS:
            values = [run["models"][model][key] for run in runs if key in run["models"].get(model, {})]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                summary[model][key] = {"mean": statistics.fmean(values), "std": std, "runs": values}
    return summary


def paired(runs: list[dict], a: str, b: str, metric: str) -> dict:
    """Per-seed relative difference ``a / b - 1`` of ``metric``, its mean, sign count and paired tests."""
    from scipy import stats

    x = [run["models"][a][metric] for run in runs]
    y = [run["models"][b][metric] for run in runs]
    out = {"per_seed": [xi / yi - 1 for xi, yi in zip(x, y)], "positive": sum(xi > yi for xi, yi in zip(x, y)), "seeds": len(x)}
    out["mean"] = statistics.fmean(out["per_seed"])
    if len(x) >= 2 and any(xi != yi for xi, yi in zip(x, y)):
        out["t_test_p"] = float(stats.ttest_rel(x, y).pvalue)  # paired t-test, two-sided
        out["wilcoxon_p"] = float(stats.wilcoxon(x, y).pvalue)  # exact signed-rank test, two-sided
    return out


def targets(dataset: str, summary: dict, runs: list[dict]) -> dict:
    """The issue's targets, each with its measured value and whether it is met."""
    mean = lambda m, k: summary[m][k]["mean"]  # noqa: E731
    # Tuned ALS: the better of ALS folding in train + validation and ALS refitted on them
    # (the two-tower models are refitted on train + validation too).
    als = max(("als", "als_refit"), key=lambda m: mean(m, "ndcg@10"))
    teacher_vs_als = mean("teacher", "ndcg@10") / mean(als, "ndcg@10")
    wanted_vs_als = 1.10 if dataset == "ml100k" else 1.0
    kd_gain = paired(runs, "student_kd", "student_plain", "ndcg@10")
    checks = {
        "teacher_ndcg@10_over_als": {"value": teacher_vs_als, "target": f">= {wanted_vs_als:.2f} (vs {als})",
                                     "met": teacher_vs_als >= wanted_vs_als, "paired": paired(runs, "teacher", als, "ndcg@10")},
        "kd_retention_ndcg@10": {"value": mean("student_kd", "ndcg@10") / mean("teacher", "ndcg@10"), "target": ">= 0.97"},
        "kd_retention_recall@20": {"value": mean("student_kd", "recall@20") / mean("teacher", "recall@20"), "target": ">= 0.97"},
        "student_params_share": {"value": mean("student_kd", "trainable_params") / mean("teacher", "trainable_params"),
                                 "target": "<= 0.10"},
        "kd_over_plain_ndcg@10": {"value": kd_gain["mean"], "target": ">= +5%, positive on >= 4 of 5 seeds",
                                  "met": kd_gain["mean"] >= 0.05 and kd_gain["positive"] >= 4, "paired": kd_gain},
        "student_throughput_over_teacher": {"value": mean("student_kd", "throughput_users_per_s") / mean("teacher", "throughput_users_per_s"),
                                            "target": ">= 2 (ML-100K, batch 256)"},
    }
    checks["kd_retention_ndcg@10"]["met"] = checks["kd_retention_ndcg@10"]["value"] >= 0.97
    checks["kd_retention_recall@20"]["met"] = checks["kd_retention_recall@20"]["value"] >= 0.97
    checks["student_params_share"]["met"] = checks["student_params_share"]["value"] <= 0.10
    checks["student_throughput_over_teacher"]["met"] = checks["student_throughput_over_teacher"]["value"] >= 2.0
    return checks


def markdown(dataset: str, summary: dict, checks: dict, runs: list[dict]) -> str:
    """The README tables: quality and cost (mean ± std), per-seed paired differences, targets."""
    fmt = lambda m, k, d=4: f"{summary[m][k]['mean']:.{d}f} ± {summary[m][k]['std']:.{d}f}" if k in summary[m] else "–"  # noqa: E731
    seeds = [run["seed"] for run in runs]
    lines = [f"{DATASETS[dataset]['label']}, test split, mean ± std over paired seeds {seeds} (`bench/quality.py --dataset {dataset}`).", "",
             "| model | NDCG@10 | Recall@20 | Recall@10 | NDCG@20 | HitRate@10 | MRR | coverage@10 | params | p50 ms | users/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in MODELS:
        cost = lambda k, d: f"{summary[m][k]['mean']:,.{d}f}" if k in summary[m] else "–"  # noqa: E731
        lines.append(f"| {m} | {fmt(m, 'ndcg@10')} | {fmt(m, 'recall@20')} | {fmt(m, 'recall@10')} | {fmt(m, 'ndcg@20')} | "
                     f"{fmt(m, 'hitrate@10')} | {fmt(m, 'mrr')} | {fmt(m, 'coverage@10', 3)} | {cost('trainable_params', 0)} | "
                     f"{cost('latency_ms_p50', 1)} | {cost('throughput_users_per_s', 0)} |")
    lines += ["", "Per seed (NDCG@10): " + ", ".join(
        f"seed {r['seed']}: teacher {r['models']['teacher']['ndcg@10']:.4f}, KD {r['models']['student_kd']['ndcg@10']:.4f}, "
        f"plain {r['models']['student_plain']['ndcg@10']:.4f}, ALS {r['models']['als']['ndcg@10']:.4f}"
        + (f", ALS refit {r['models']['als_refit']['ndcg@10']:.4f}" if "als_refit" in r["models"] else "") for r in runs)]
    lines += ["", "| target | measured | wanted | met |", "|---|---|---|---|"]
    for name, check in checks.items():
        extra = ""
        if "paired" in check:
            p = check["paired"]
            tests = f"; paired t p={p['t_test_p']:.3f}, Wilcoxon p={p['wilcoxon_p']:.3f}" if "t_test_p" in p else ""
            extra = f" (per seed {', '.join(f'{d:+.1%}' for d in p['per_seed'])}; {p['positive']}/{p['seeds']} positive{tests})"
        lines.append(f"| {name} | {check['value']:.3f}{extra} | {check['target']} | {'met' if check['met'] else 'NOT met'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="ml100k")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    parser.add_argument("--data-root", help="default: bench/work/quality (ML-100K) or bench/work/quality_<dataset>")
    parser.add_argument("--out", help="default: bench/results/quality_<dataset>")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON")
    args = parser.parse_args(argv)
    spec = DATASETS[args.dataset]
    suffix = "" if args.dataset == "ml100k" else f"_{args.dataset}"
    catalog = Catalog(Path(args.data_root or REPO_ROOT / "bench" / "work" / f"quality{suffix}"))
    cfg = load_config(cli.overrides(args.set + [f"features.window_days={spec['window_days']}"]))
    prepare_features(catalog, args.dataset)
    runs = []
    for seed in args.seeds:
        runs.append({"seed": seed, **run_seed(catalog, spec["ds"], cfg, seed)})
        log.info("seed %d done in %.0fs", seed, runs[-1]["seconds"])
    summary = summarise(runs)
    checks = targets(args.dataset, summary, runs)
    import tensorflow as tf

    payload = {"date": dt.date.today().isoformat(), "dataset": spec["label"], "ds": spec["ds"], "seeds": args.seeds,
               "overrides": args.set, "config": cfg.to_dict(),
               "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(), "tensorflow": tf.__version__},
               "summary": summary, "targets": checks, "runs": runs}
    out = Path(args.out or REPO_ROOT / "bench" / "results" / f"quality_{'ml100k' if not suffix else args.dataset}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    table = markdown(args.dataset, summary, checks, runs)
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
