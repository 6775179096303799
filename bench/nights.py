"""Many nights in a row, cold-started against warm-started, side by side.

Run as ``.venv/bin/python bench/nights.py [--nights 7] [--last-ds 1998-04-22] [--window-days 240]
[--out bench/results/nights]``.

The data is MovieLens-100K's real event log (``recsys-movielens``), whose last months have the
drift a nightly pipeline meets: users and items arrive every day and popularity moves. Each of
the last ``--nights`` dates is one night: its window of ``--window-days`` days ending that day
goes through the DAG's own step functions, in order, exactly as the DAG calls them
(:func:`pipeline.steps.run.resolve_run`, the feature job, ``train_teacher``, ``soft_targets``, every rung
of the ladder, ``evaluate`` (no baselines: they do not depend on the start), the gate,
promotion or rejection). Several data roots, each with its own registry, run the same nights:
one with ``training.warm_start`` off (every night from random weights), one per warm policy
with it on (each night from the previous night's models; ``--warm-policy SCALE PATIENCE [KEEP]``
sets ``training.warm_learning_rate_scale``, ``training.warm_patience`` and ``training.warm_keep``,
by default the product's). Per night: wall time per task, NDCG@10 (test) of teacher, promoted student and
champion, each model's validation NDCG@10 (its selection run's, on the days before the test
days) and the gate's decision. The first night is cold in every mode: it runs once and its data
root is copied into every warm mode's. The summary picks the warm policy with the best validation
ratio to cold: a policy is chosen on validation, never on the test numbers it reports.

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
            "epochs": {"teacher": teacher["epochs"], **{s["name"]: s["epochs"] for s in students}},
            "ndcg@10": {"teacher": models["teacher"]["ndcg@10"], "student": models[gate["student_model"]]["ndcg@10"],
                        "champion": (models.get("champion") or {}).get("ndcg@10"),
                        **{s["name"]: models[s["name"]]["ndcg@10"] for s in students}},
            "validation_ndcg@10": {"teacher": teacher["metrics"]["validation"]["ndcg@10"],
                                   **{s["name"]: s["metrics"]["validation"]["ndcg@10"] for s in students}}}


def clone_root(source: Path, target: Path) -> None:
    """``target``: a copy of the data root ``source``, the paths its records hold rewritten to it
    (the registry, the models' metadata and the manifests name artifacts by absolute path)."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, symlinks=True)
    for path in target.rglob("*"):
        if path.suffix in (".json", ".jsonl") and path.is_file():
            text = path.read_text()
            if str(source) in text:
                path.write_text(text.replace(str(source), str(target)))


def nights_of(last_ds: str, count: int) -> list[str]:
    last = dt.date.fromisoformat(last_ds)
    return [(last - dt.timedelta(days=count - 1 - i)).isoformat() for i in range(count)]


def summarise_mode(cold: list[dict], warm: list[dict]) -> dict:
    """One warm mode against cold: means over the nights after the first (cold in every mode).

    Test ratios: teacher, and the promoted student (whichever rung the gate chose each night).
    Validation ratios: teacher and the mean over the rungs, each rung against the same rung.
    """
    later = range(1, min(len(cold), len(warm)))
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    quality = {role: mean([warm[i]["ndcg@10"][role] / cold[i]["ndcg@10"][role] for i in later]) for role in ("teacher", "student")}
    rungs = [name for name in cold[0].get("validation_ndcg@10", {}) if name != "teacher"]
    ratio = lambda i, name: warm[i]["validation_ndcg@10"][name] / cold[i]["validation_ndcg@10"][name]  # noqa: E731
    validation = {"teacher": mean([ratio(i, "teacher") for i in later]),
                  "students": mean([mean([ratio(i, name) for name in rungs]) for i in later])} if rungs else {}
    time_share = mean([warm[i]["training_seconds"] / cold[i]["training_seconds"] for i in later])
    return {"warm_over_cold_ndcg": quality, "warm_over_cold_validation_ndcg": validation,
            "warm_over_cold_training_time": time_share,
            "quality_target_met": all(q >= MIN_WARM_QUALITY_SHARE for q in quality.values()),
            "time_target_met": time_share <= MAX_WARM_TRAINING_SHARE}


def summarise(results: dict) -> dict:
    """Every warm mode against cold, and the warm policy chosen on validation: the best mean of
    the teacher's and the students' validation ratios (none when validation was not recorded)."""
    modes = {mode: summarise_mode(results["modes"]["cold"], results["modes"][mode]) for mode in warm_modes(results)}
    scored = {mode: sum(s["warm_over_cold_validation_ndcg"].values()) / 2 for mode, s in modes.items()
              if s["warm_over_cold_validation_ndcg"]}
    return {"modes": modes, "chosen_on_validation": max(scored, key=scored.get) if scored else None}


def warm_modes(results: dict) -> list[str]:
    return [mode for mode in results["modes"] if mode != "cold"]


def mode_name(policy: Sequence[float] | None) -> str:
    """``warm`` for the product's own warm policy, else ``warm lr×SCALE p=PATIENCE[ keep=KEEP]``."""
    if policy is None:
        return "warm"
    return f"warm lr×{policy[0]:g} p={int(policy[1])}" + (f" keep={policy[2]:g}" if len(policy) > 2 else "")


def write_results(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, sort_keys=True))
    modes = results["modes"]
    done, asked = min(len(rows) for rows in modes.values()), results.get("nights_asked", len(modes["cold"]))
    progress = "" if done >= asked else f" ({done} of the {asked} nights asked are done: the run was cut short or is still going)"
    lines = ["# Many nights: cold against warm start", "", f"Command: `{results['command']}`{progress}", "",
             f"Machine: {results['machine']}", "",
             "| night | mode | decision (rung) | teacher NDCG@10 | student NDCG@10 | champion NDCG@10 | validation NDCG@10 "
             "teacher / rungs | epochs teacher / rungs | teacher s | soft targets s | students s | features s | evaluate s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i in range(max(len(rows) for rows in modes.values())):
        for mode, rows in modes.items():
            if i >= len(rows):
                continue
            r = rows[i]
            champion = r["ndcg@10"]["champion"]
            students = sum(v for k, v in r["seconds"].items() if k.startswith("distill"))
            validation = " / ".join(f"{v:.4f}" for v in r.get("validation_ndcg@10", {}).values()) or "–"
            epochs = " / ".join(str(v) for v in r.get("epochs", {"teacher": r["teacher_epochs"]}).values())
            lines.append(f"| {r['ds']} | {mode} | {r['decision']} ({r['student_model']}) | {r['ndcg@10']['teacher']:.4f} | "
                         f"{r['ndcg@10']['student']:.4f} | {'–' if champion is None else f'{champion:.4f}'} | {validation} | {epochs} | "
                         f"{r['seconds']['train_teacher']:.0f} | {r['seconds'].get('soft_targets', float('nan')):.0f} | {students:.0f} | "
                         f"{r['seconds']['extract_features']:.0f} | {r['seconds']['evaluate']:.0f} |")
    s = results["summary"]
    lines += ["", "Nights after the first (the first is cold in every mode), each warm mode against cold:", "",
              "| mode | test NDCG@10 teacher | test NDCG@10 promoted student | validation NDCG@10 teacher | "
              "validation NDCG@10 rungs (each against itself) | training time | quality target (>= "
              f"{MIN_WARM_QUALITY_SHARE}) | time target (<= 1/3) |", "|---|---|---|---|---|---|---|---|"]
    for mode, m in s["modes"].items():
        validation = m["warm_over_cold_validation_ndcg"]
        lines.append(f"| {mode} | {m['warm_over_cold_ndcg']['teacher']:.3f} | {m['warm_over_cold_ndcg']['student']:.3f} | "
                     f"{validation.get('teacher', float('nan')):.3f} | {validation.get('students', float('nan')):.3f} | "
                     f"{m['warm_over_cold_training_time']:.2f} | {'met' if m['quality_target_met'] else 'NOT met'} | "
                     f"{'met' if m['time_target_met'] else 'NOT met'} |")
    if s["chosen_on_validation"] and len(s["modes"]) > 1:
        lines += ["", f"Chosen on validation (best mean of the teacher's and the rungs' validation ratios): "
                      f"**{s['chosen_on_validation']}**."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(out.with_suffix(".png"), results)


def _plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    quality, cost = fig.subplots(1, 2)
    styles = ["o-", "s--", "^:", "d-."]
    for (mode, rows), style in zip(results["modes"].items(), styles * 3):
        x = range(len(rows))
        for role in ("teacher", "student"):
            quality.plot(x, [r["ndcg@10"][role] for r in rows], style, label=f"{role}, {mode}")
        cost.plot(x, [r["training_seconds"] for r in rows], style, label=mode)
    nights = results["modes"]["cold"]
    for ax, label in ((quality, "NDCG@10 (test)"), (cost, "training seconds (teacher + students)")):
        ax.set_xticks(list(range(len(nights))), [r["ds"] for r in nights], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=7)
    parser.add_argument("--last-ds", default="1998-04-22")
    parser.add_argument("--window-days", type=int, default=240)
    parser.add_argument("--ladder", type=float, nargs="+", default=[0.05, 0.10], help="student_ladder of every night")
    parser.add_argument("--warm-policy", type=float, nargs="+", action="append", metavar="SCALE PATIENCE [KEEP]",
                        help="a warm mode with training.warm_learning_rate_scale=SCALE, training.warm_patience=PATIENCE "
                             "and training.warm_keep=KEEP (1 if not given); repeatable; none: one warm mode with the product's defaults")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "nights")
    args = parser.parse_args(argv)
    if any(len(policy) not in (2, 3) for policy in args.warm_policy or []):
        parser.error("--warm-policy takes SCALE PATIENCE [KEEP]")
    from pipeline.data.movielens import main as movielens

    raw = WORK / "raw"
    if not raw.is_dir():
        movielens(["--out", str(raw)])
    modes = {"cold": {"warm_start": False}}
    for policy in args.warm_policy or [None]:
        overrides = {} if policy is None else {"config_overrides": {"training": {
            "warm_learning_rate_scale": policy[0], "warm_patience": int(policy[1]),
            **({"warm_keep": policy[2]} if len(policy) > 2 else {})}}}
        modes[mode_name(policy)] = {"warm_start": True, **overrides}
    results = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "machine": machine_info(), "modes": {mode: [] for mode in modes}, "nights_asked": args.nights}
    roots = {mode: WORK / f"mode{i}" for i, mode in enumerate(modes)}
    for root in roots.values():
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(raw, root / "raw")
    for n, ds in enumerate(nights_of(args.last_ds, args.nights)):
        for mode, params in modes.items():  # interleaved: every mode of a night meets the same machine load
            if n == 0 and mode != "cold":  # the first night is cold in every mode: run once, copied
                clone_root(roots["cold"], roots[mode])
                results["modes"][mode].append({**results["modes"]["cold"][0], "copied_from": "cold"})
                continue
            results["modes"][mode].append(night(roots[mode], ds, {"window_days": args.window_days,
                                                                  "student_ladder": args.ladder, **params}))
            log.info("%s night %s: %s", mode, ds, results["modes"][mode][-1])
        # The results so far, after every night: a run cut short still leaves its finished nights.
        results["summary"] = summarise(results)
        write_results(args.out, results)
    log.info("wrote %s.{json,md,png}: %s", args.out, results["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
