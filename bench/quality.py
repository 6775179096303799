"""Quality and cost of the teacher, every rung of the student ladder and the baselines, over paired seeds.

Run as ``.venv/bin/python bench/quality.py [--dataset ml100k|synthetic] [--seeds 42 43 44 45 46]
[--set distill.alpha=0.5 ...] [--out PATH]``.

From a clean checkout it writes the data set's raw logs (ML-100K from the recbole wheel,
or a synthetic log of another shape), runs the Spark feature job once (features are
deterministic), then for each seed, through ``pipeline.steps.chain.run_chain``, trains the
teacher, writes soft targets, distils every rung of ``distill.ladder`` (``student_kd@5%``,
``student_kd@10%`` by default) and trains the largest rung again without distillation
(``student_plain``: alpha=1, beta=0, same epochs); then ``pipeline.steps.evaluate.evaluate_run``
evaluates them all, with EASE, ALS and MostPopular, on the same test split, and the gate
chooses the rung it would promote (:mod:`bench.ladder`: every rung against the teacher, no
champion, the cheapest to serve that passes). Teacher, rungs and plain student share seed,
features and split, so per-seed differences are paired.

Writes ``bench/results/quality_<dataset>.json`` (every seed, mean and spread, paired
differences and tests, the gate's pick per seed, targets) and ``.md`` (the README tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.ladder import gate_ladder, plain_at_largest_rung, rungs
from pipeline import cli
from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.io import write_json

REPO_ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench.quality")
# Data set -> the date its window ends on, the window, and how its raw logs are written.
DATASETS = {
    "ml100k": {"ds": "1998-04-22", "window_days": 240, "label": "MovieLens-100K (recbole 1.2.1 wheel)"},
    "synthetic": {"ds": "2024-01-31", "window_days": 30, "label": "synthetic, 20k users x 10k items, 400k events",
                  "shape": {"users": 20_000, "items": 10_000, "days": 30, "events": 400_000, "seed": 7}},
}
DS = DATASETS["ml100k"]["ds"]  # the ML-100K date, for the other ML-100K benchmarks
BASELINES = ("ease", "ease_refit", "als", "als_refit", "most_popular")
METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20", "hitrate@10", "mrr", "coverage@10")
COSTS = ("trainable_params", "saved_model_bytes", "latency_ms_p50", "latency_ms_p99", "throughput_users_per_s")
RETENTION_TARGET = 0.97  # a rung keeps at least this share of the teacher's NDCG@10 and Recall@20
KD_GAIN_TARGET = 0.05  # distillation beats the plain student by at least this much NDCG@10 ...
KD_GAIN_SEEDS = 4  # ... on at least this many of 5 seeds


def model_names(cfg) -> tuple[str, ...]:
    """Every model of a seed, in table order: teacher, the rungs, the plain student, the baselines."""
    return ("teacher", *rungs(cfg), "student_plain", *BASELINES)


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
    """Teacher, every rung, plain student and baselines of one seed on one test split, and the gate's pick."""
    from pipeline.steps.chain import run_chain
    from pipeline.steps.evaluate import evaluate_run, run_models

    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, seed=seed))
    started = time.perf_counter()
    chain = run_chain(ds, catalog, cfg, plain_baseline=True)
    result = evaluate_run(ds, catalog, cfg, run_models(ds, catalog, cfg, plain=True))
    stages = {"teacher": chain["teacher"], **chain["students"], "student_plain": chain["student_plain"]}
    result["training"] = {name: {k: stage[k] for k in ("best_epoch", "epochs", "seconds") if k in stage}
                          for name, stage in stages.items()}
    result["gate"] = gate_ladder(cfg, result["models"])
    log.info("seed %d: gate %s for %s; %s", seed, result["gate"]["decision"], result["gate"]["chosen"], result["gate"]["why"])
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def summarise(runs: list[dict], names: tuple[str, ...]) -> dict:
    """Mean and (sample) standard deviation over seeds of every metric and cost of every model."""
    summary = {}
    for model in names:
        summary[model] = {}
        for key in METRICS + COSTS:
            values = [run["models"][model][key] for run in runs if key in run["models"].get(model, {})]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                summary[model][key] = {"mean": statistics.fmean(values), "std": std, "runs": values}
    return {model: row for model, row in summary.items() if row}


def paired(runs: list[dict], a: str, b: str, metric: str) -> dict:
    """Per-seed relative difference ``a / b - 1`` of ``metric``, its mean, sign counts and paired tests."""
    from scipy import stats

    x = [run["models"][a][metric] for run in runs]
    y = [run["models"][b][metric] for run in runs]
    out = {"a": a, "b": b, "metric": metric, "per_seed": [xi / yi - 1 for xi, yi in zip(x, y)],
           "positive": sum(xi > yi for xi, yi in zip(x, y)), "seeds": len(x)}
    out["mean"] = statistics.fmean(out["per_seed"])
    out["at_least_5%"] = sum(d >= KD_GAIN_TARGET for d in out["per_seed"])
    if len(x) >= 2 and any(xi != yi for xi, yi in zip(x, y)):
        out["t_test_p"] = float(stats.ttest_rel(x, y).pvalue)  # paired t-test, two-sided
        out["wilcoxon_p"] = float(stats.wilcoxon(x, y).pvalue)  # exact signed-rank test, two-sided
    return out


def better(summary: dict, *names: str) -> str | None:
    """Of ``names``, the model with the best mean NDCG@10 (None when none was evaluated)."""
    present = [m for m in names if "ndcg@10" in summary.get(m, {})]
    return max(present, key=lambda m: summary[m]["ndcg@10"]["mean"]) if present else None


def ladder(cfg, summary: dict, runs: list[dict]) -> dict:
    """Per rung: retention of the teacher's NDCG@10 and Recall@20 (means and paired), parameter
    share, KD gain over the plain student (paired), users/s against the teacher's (as measured
    inside the run), and on how many seeds the gate passed it and promoted it."""
    mean = lambda m, k: summary[m][k]["mean"]  # noqa: E731
    out = {}
    for name, share in rungs(cfg).items():
        row = {"share": share, "params_share": mean(name, "trainable_params") / mean("teacher", "trainable_params"),
               "retention_ndcg@10": mean(name, "ndcg@10") / mean("teacher", "ndcg@10"),
               "retention_recall@20": mean(name, "recall@20") / mean("teacher", "recall@20"),
               "vs_teacher_ndcg@10": paired(runs, name, "teacher", "ndcg@10"),
               "kd_over_plain_ndcg@10": paired(runs, name, "student_plain", "ndcg@10"),
               "passes_gate": sum(next(r for r in run["gate"]["ladder"] if r["name"] == name)["decision"] == "BLESSED" for run in runs),
               "promoted": sum(run["gate"]["chosen"] == name and run["gate"]["decision"] == "BLESSED" for run in runs)}
        if "throughput_users_per_s" in summary[name]:
            row["users_per_s_over_teacher"] = mean(name, "throughput_users_per_s") / mean("teacher", "throughput_users_per_s")
        out[name] = row
    return out


def targets(dataset: str, summary: dict, runs: list[dict], rows: dict) -> dict:
    """The issue's targets, each with its measured value and whether it is met."""
    mean = lambda m, k: summary[m][k]["mean"]  # noqa: E731
    # Tuned ALS: the better of ALS folding in train + validation and ALS refitted on them
    # (the two-tower models are refitted on train + validation too).
    als = better(summary, "als", "als_refit")
    teacher_vs_als = mean("teacher", "ndcg@10") / mean(als, "ndcg@10")
    wanted_vs_als = 1.10 if dataset == "ml100k" else 1.0
    checks = {"teacher_ndcg@10_over_als": {"value": teacher_vs_als, "target": f">= {wanted_vs_als:.2f} (vs {als})",
                                           "met": teacher_vs_als >= wanted_vs_als, "paired": paired(runs, "teacher", als, "ndcg@10")}}
    for name, row in rows.items():
        for metric in ("ndcg@10", "recall@20"):
            value = row[f"retention_{metric}"]
            checks[f"{name}_retention_{metric}"] = {"value": value, "target": f">= {RETENTION_TARGET}", "met": value >= RETENTION_TARGET}
        if row["share"] is not None:
            checks[f"{name}_params_share"] = {"value": row["params_share"], "target": f"<= {row['share']:.2f}",
                                              "met": row["params_share"] <= row["share"]}
    largest = list(rows)[-1]  # the plain student has its size
    gain = rows[largest]["kd_over_plain_ndcg@10"]
    checks[f"{largest}_over_plain_ndcg@10"] = {
        "value": gain["mean"], "target": f">= +{KD_GAIN_TARGET:.0%} on >= {KD_GAIN_SEEDS} of 5 seeds ({len(runs)} run)",
        "met": gain["at_least_5%"] >= KD_GAIN_SEEDS, "paired": gain}
    return checks


def _paired_text(p: dict, kd: bool = False) -> str:
    """Per-seed differences, sign count (``kd``: and seeds at the KD target), paired tests."""
    tests = f"; paired t p={p['t_test_p']:.3f}, Wilcoxon p={p['wilcoxon_p']:.3f}" if "t_test_p" in p else ""
    at_target = f", {p['at_least_5%']}/{p['seeds']} at least +{KD_GAIN_TARGET:.0%}" if kd else ""
    return f"per seed {', '.join(f'{d:+.1%}' for d in p['per_seed'])}; {p['positive']}/{p['seeds']} positive{at_target}{tests}"


def markdown(dataset: str, cfg, summary: dict, rows: dict, comparisons: dict, checks: dict, runs: list[dict]) -> str:
    """The README tables: every model (mean ± std), the ladder, paired comparisons, the gate per seed, targets."""
    fmt = lambda m, k, d=4: f"{summary[m][k]['mean']:.{d}f} ± {summary[m][k]['std']:.{d}f}" if k in summary[m] else "–"  # noqa: E731
    seeds = [run["seed"] for run in runs]
    names = [m for m in model_names(cfg) if m in summary]
    lines = [f"{DATASETS[dataset]['label']}, test split, mean ± std over paired seeds {seeds} (`bench/quality.py --dataset {dataset}`); "
             f"`student_plain` is the largest rung trained without distillation.", "",
             "| model | NDCG@10 | Recall@20 | Recall@10 | NDCG@20 | HitRate@10 | MRR | coverage@10 | params | p50 ms | users/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in names:
        cost = lambda k, d: f"{summary[m][k]['mean']:,.{d}f}" if k in summary[m] else "–"  # noqa: E731
        lines.append(f"| {m} | {fmt(m, 'ndcg@10')} | {fmt(m, 'recall@20')} | {fmt(m, 'recall@10')} | {fmt(m, 'ndcg@20')} | "
                     f"{fmt(m, 'hitrate@10')} | {fmt(m, 'mrr')} | {fmt(m, 'coverage@10', 3)} | {cost('trainable_params', 0)} | "
                     f"{cost('latency_ms_p50', 1)} | {cost('throughput_users_per_s', 0)} |")
    lines += ["", "Per seed (NDCG@10): " + "; ".join(
        f"seed {r['seed']}: " + ", ".join(f"{m} {r['models'][m]['ndcg@10']:.4f}" for m in names if m in r["models"]) for r in runs) + "."]
    lines += ["", "The ladder (retention: the rung's mean over the teacher's; KD gain: paired NDCG@10 over `student_plain`, "
              "the same size as the largest rung; users/s as measured inside the run, batch 256, noisy: see `serving_cost.md`):", "",
              "| rung | params (share of teacher) | NDCG@10 retention | Recall@20 retention | KD over plain, NDCG@10 | "
              "users/s / teacher | passes the gate | promoted |", "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        gain = row["kd_over_plain_ndcg@10"]
        speed = f"{row['users_per_s_over_teacher']:.2f}x" if "users_per_s_over_teacher" in row else "–"
        lines.append(f"| {name} | {summary[name]['trainable_params']['mean']:,.0f} ({row['params_share']:.3f}) | "
                     f"{row['retention_ndcg@10']:.3f} | {row['retention_recall@20']:.3f} | {gain['mean']:+.1%} ({_paired_text(gain, kd=True)}) | "
                     f"{speed} | {row['passes_gate']}/{len(runs)} | {row['promoted']}/{len(runs)} |")
    lines += ["", "| paired comparison | NDCG@10, mean | per seed |", "|---|---|---|"]
    for label, p in comparisons.items():
        lines.append(f"| {label} | {p['mean']:+.1%} | {_paired_text(p)} |")
    lines += ["", "The gate per seed (every rung against the teacher, no champion; the cheapest to serve that passes):", "",
              "| seed | decision | promoted rung | why |", "|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['gate']['decision']} | {r['gate']['chosen']} | {r['gate']['why']} |" for r in runs]
    lines += ["", "| target | measured | wanted | met |", "|---|---|---|---|"]
    for name, check in checks.items():
        extra = f" ({_paired_text(check['paired'], kd=name.endswith('_over_plain_ndcg@10'))})" if "paired" in check else ""
        lines.append(f"| {name} | {check['value']:.3f}{extra} | {check['target']} | {'met' if check['met'] else 'NOT met'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="ml100k")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    parser.add_argument("--data-root", help="default: bench/work/quality (ML-100K) or bench/work/quality_<dataset>")
    parser.add_argument("--out", help="default: bench/results/quality_<dataset> (.json and .md are added)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON")
    parser.add_argument("--summarise-only", action="store_true",
                        help="train nothing: the tables of the seeds already done (of those asked)")
    args = parser.parse_args(argv)
    asked = list(args.seeds)
    spec = DATASETS[args.dataset]
    suffix = "" if args.dataset == "ml100k" else f"_{args.dataset}"
    catalog = Catalog(Path(args.data_root or REPO_ROOT / "bench" / "work" / f"quality{suffix}"))
    cfg = plain_at_largest_rung(load_config(cli.overrides(args.set + [f"features.window_days={spec['window_days']}"])))
    prepare_features(catalog, args.dataset)
    # Each seed's result is kept as soon as it is done: a run stopped half-way resumes there, and
    # several processes (each with some of the seeds) can share one data root.
    seed_files = catalog.root / "seeds" / cfg.config_hash()[:12]
    seed_files.mkdir(parents=True, exist_ok=True)
    started, runs = time.perf_counter(), []
    for seed in args.seeds:
        kept = seed_files / f"{seed}.json"
        if kept.is_file():
            runs.append(json.loads(kept.read_text()))
            log.info("seed %d: kept from %s", seed, kept)
        elif not args.summarise_only:
            runs.append({"seed": seed, **run_seed(catalog, spec["ds"], cfg, seed)})
            write_json(kept, runs[-1])
            log.info("seed %d done in %.0fs", seed, runs[-1]["seconds"])
    if not runs:
        log.error("no seed of %s is done (kept in %s)", args.seeds, seed_files)
        return 1
    args.seeds = [run["seed"] for run in runs]
    summary = summarise(runs, model_names(cfg))
    rows = ladder(cfg, summary, runs)
    comparisons = {f"teacher vs {m}": paired(runs, "teacher", m, "ndcg@10")
                   for m in (better(summary, "als", "als_refit"), better(summary, "ease", "ease_refit")) if m}
    checks = targets(args.dataset, summary, runs, rows)
    import tensorflow as tf

    payload = {"date": dt.date.today().isoformat(), "dataset": spec["label"], "ds": spec["ds"], "seeds": args.seeds, "seeds_asked": asked,
               "overrides": args.set, "config": cfg.to_dict(), "seconds": round(time.perf_counter() - started, 1),
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "tensorflow": tf.__version__,
                           "load_average_end": list(os.getloadavg())},
               "summary": summary, "ladder": rows, "comparisons": comparisons, "targets": checks, "runs": runs}
    out = Path(args.out or REPO_ROOT / "bench" / "results" / f"quality_{'ml100k' if not suffix else args.dataset}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    table = markdown(args.dataset, cfg, summary, rows, comparisons, checks, runs)
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
