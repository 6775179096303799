"""Many nights in a row, cold-started against warm-started, side by side.

Run as ``.venv/bin/python bench/nights.py [--nights 7] [--last-ds 1998-04-22] [--window-days 240]
[--out bench/results/nights]``.

The data is MovieLens-100K's real event log (``recsys-movielens``), whose last months have the
drift a nightly pipeline meets: users and items arrive every day and popularity moves. Each of
the last ``--nights`` dates is one night: its window of ``--window-days`` days ending that day
goes through the DAG's own step functions, in order, exactly as the DAG calls them
(:func:`pipeline.steps.run.resolve_run`, the feature job, ``train_teacher``, ``soft_targets``, every rung
of the ladder, ``evaluate`` (no baselines: they do not depend on the start), the gate,
promotion or rejection). Two data roots, each with its own registry, run the same nights: one
with ``training.warm_start`` off (every night from random weights), one with it on (each night
from the previous night's models). Per night: wall time per task, NDCG@10 (test) of teacher,
promoted student and champion, and the gate's decision.

Writes ``<out>.json``, ``<out>.md`` (tables, means, the targets met or not) and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence


REPO_ROOT = Path(__file__).resolve().parents[1]
WORK = REPO_ROOT / "bench" / "work" / "nights"
log = logging.getLogger("bench.nights")
# Targets of issue 30, reported as met or not.
MIN_WARM_QUALITY_SHARE = 0.99
MAX_WARM_TRAINING_SHARE = 1 / 3


def machine_info() -> str:
    """What the numbers were measured on (the benchmark requirements, e.g. DuckDB, are not needed)."""
    import platform

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{len(os.sched_getaffinity(0))} cores, {platform.platform()}, Python {platform.python_version()}; load at start {load}"


def night(data_root: Path, ds: str, params: dict) -> dict:
    """One night through the DAG's step functions; returns its timings, metrics and decision."""
    from pipeline.steps import run as steps
    from pipeline.steps.distill import distill_student
    from pipeline.steps.evaluate import evaluate_run
    from pipeline.steps.soft_targets import generate_soft_targets
    from pipeline.steps.train_teacher import train_teacher
    from spark_jobs import extract_features

    os.environ["RECSYS_DATA_ROOT"] = str(data_root)
    due = dt.datetime.combine(dt.date.fromisoformat(ds) + dt.timedelta(days=1), dt.time(2), tzinfo=dt.timezone.utc)
    seconds: dict[str, float] = {}

    def timed(name: str, call):
        started = time.perf_counter()
        result = call()
        seconds[name] = round(time.perf_counter() - started, 1)
        return result

    run = steps.resolve_run({**params, "ds": ds}, due, f"bench__{ds}")
    steps.validate_raw(run)
    code = timed("extract_features", lambda: extract_features.main([*steps.spark_arguments(run), "--master", "local[2]"]))
    if code != 0:
        raise RuntimeError(f"the feature job failed for ds={ds}")
    ds, catalog, cfg = steps.settings(run)
    steps.check_features(catalog, ds)
    teacher = timed("train_teacher", lambda: train_teacher(ds, catalog, cfg))
    timed("soft_targets", lambda: generate_soft_targets(ds, catalog, cfg))
    students = []
    for share in cfg.ladder_rungs():
        rung = timed(f"distill {cfg.rung_name(share)}", lambda: distill_student(ds, catalog, cfg.rung(share)))
        students.append({**rung, "rung": share, "name": cfg.rung_name(share)})
    exported = {"teacher": teacher["path"], **{s["name"]: s["path"] for s in students}}
    evaluation = timed("evaluate", lambda: evaluate_run(ds, catalog, cfg, exported, champion_dir=steps.champion_dir(catalog),
                                                        baselines=False))
    gate = steps.decide(run, evaluation)
    chosen = next(s for s in students if s["name"] == gate["student_model"])
    if gate["blessed"]:
        steps.promote(run, teacher, chosen, evaluation, gate)
    else:
        steps.record_rejection(run, teacher, chosen, evaluation, gate)
    models = evaluation["models"]
    training = seconds["train_teacher"] + sum(v for k, v in seconds.items() if k.startswith("distill"))
    return {"ds": ds, "seconds": seconds, "training_seconds": round(training, 1), "decision": gate["decision"],
            "student_model": gate["student_model"], "teacher_epochs": teacher["epochs"],
            "student_epochs": chosen["epochs"],
            "ndcg@10": {"teacher": models["teacher"]["ndcg@10"], "student": models[gate["student_model"]]["ndcg@10"],
                        "champion": (models.get("champion") or {}).get("ndcg@10")}}


def nights_of(last_ds: str, count: int) -> list[str]:
    last = dt.date.fromisoformat(last_ds)
    return [(last - dt.timedelta(days=count - 1 - i)).isoformat() for i in range(count)]


def summarise(results: dict) -> dict:
    """Means over the nights after the first (the first night is cold in both modes)."""
    cold, warm = results["cold"], results["warm"]
    later = range(1, len(cold))
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    quality = {role: mean([warm[i]["ndcg@10"][role] / cold[i]["ndcg@10"][role] for i in later]) for role in ("teacher", "student")}
    time_share = mean([warm[i]["training_seconds"] / cold[i]["training_seconds"] for i in later])
    return {"warm_over_cold_ndcg": quality, "warm_over_cold_training_time": time_share,
            "quality_target_met": all(q >= MIN_WARM_QUALITY_SHARE for q in quality.values()),
            "time_target_met": time_share <= MAX_WARM_TRAINING_SHARE}


def write_results(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, sort_keys=True))
    done, asked = len(results["cold"]), results.get("nights_asked", len(results["cold"]))
    progress = "" if done >= asked else f" ({done} of the {asked} nights asked are done: the run was cut short or is still going)"
    lines = ["# Many nights: cold against warm start", "", f"Command: `{results['command']}`{progress}", "",
             f"Machine: {results['machine']}", "",
             "| night | mode | decision (rung) | teacher NDCG@10 | student NDCG@10 | champion NDCG@10 | teacher s (epochs) | "
             "soft targets s | students s | features s | evaluate s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i in range(len(results["cold"])):
        for mode in ("cold", "warm"):
            r = results[mode][i]
            champion = r["ndcg@10"]["champion"]
            students = sum(v for k, v in r["seconds"].items() if k.startswith("distill"))
            lines.append(f"| {r['ds']} | {mode} | {r['decision']} ({r['student_model']}) | {r['ndcg@10']['teacher']:.4f} | "
                         f"{r['ndcg@10']['student']:.4f} | {'–' if champion is None else f'{champion:.4f}'} | "
                         f"{r['seconds']['train_teacher']:.0f} ({r['teacher_epochs']}) | {r['seconds'].get('soft_targets', float('nan')):.0f} | {students:.0f} | "
                         f"{r['seconds']['extract_features']:.0f} | {r['seconds']['evaluate']:.0f} |")
    s = results["summary"]
    lines += ["", "Nights after the first (the first is cold in both modes):", "",
              f"* warm / cold test NDCG@10: teacher {s['warm_over_cold_ndcg']['teacher']:.3f}, student "
              f"{s['warm_over_cold_ndcg']['student']:.3f} (target >= {MIN_WARM_QUALITY_SHARE}: "
              f"{'met' if s['quality_target_met'] else 'NOT met'})",
              f"* warm / cold training time (teacher + students): {s['warm_over_cold_training_time']:.2f} (target <= 1/3: "
              f"{'met' if s['time_target_met'] else 'NOT met'})"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(out.with_suffix(".png"), results)


def _plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    quality, cost = fig.subplots(1, 2)
    for mode, style in (("cold", "o-"), ("warm", "s--")):
        rows = results[mode]
        x = range(len(rows))
        for role in ("teacher", "student"):
            quality.plot(x, [r["ndcg@10"][role] for r in rows], style, label=f"{role}, {mode}")
        cost.plot(x, [r["training_seconds"] for r in rows], style, label=mode)
    for ax, label in ((quality, "NDCG@10 (test)"), (cost, "training seconds (teacher + students)")):
        ax.set_xticks(list(range(len(results["cold"]))), [r["ds"] for r in results["cold"]], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=7)
    parser.add_argument("--last-ds", default="1998-04-22")
    parser.add_argument("--window-days", type=int, default=240)
    parser.add_argument("--ladder", type=float, nargs="+", default=[0.05, 0.10], help="student_ladder of every night")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "nights")
    args = parser.parse_args(argv)
    from pipeline.data.movielens import main as movielens

    raw = WORK / "raw"
    if not raw.is_dir():
        movielens(["--out", str(raw)])
    results = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "machine": machine_info(), "cold": [], "warm": []}
    for mode in ("cold", "warm"):
        shutil.rmtree(WORK / mode, ignore_errors=True)
        shutil.copytree(raw, WORK / mode / "raw")
    results["nights_asked"] = args.nights
    for ds in nights_of(args.last_ds, args.nights):
        for mode in ("cold", "warm"):  # interleaved: both modes of a night meet the same machine load
            params = {"window_days": args.window_days, "warm_start": mode == "warm", "student_ladder": args.ladder}
            results[mode].append(night(WORK / mode, ds, params))
            log.info("%s night %s: %s", mode, ds, results[mode][-1])
        # The results so far, after every night: a run cut short still leaves its finished nights.
        results["summary"] = summarise(results)
        write_results(args.out, results)
    log.info("wrote %s.{json,md,png}: %s", args.out, results["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
