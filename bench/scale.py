"""Benchmark the whole pipeline on synthetic logs of growing size: wall time, CPU and peak RSS per task.

Run as ``make bench-scale`` (installs the benchmark requirements first), or
``.venv/bin/python bench/scale.py [--sizes 1000000 3000000 10000000] [--out bench/results/scale]``.

For each size it generates a synthetic raw log once (under ``bench/work/``, users and items
growing with the events: :func:`bench.features.world_shape`), then runs the DAG's heavy
tasks one after the other, each as its own process exactly as a user runs it by hand:

* ``extract_features``: the Spark job, GX validation on, ``local[2]``;
* ``train_teacher``, ``soft_targets``, ``distill_student``, ``evaluate`` (teacher, student,
  MostPopular and both ALS baselines on the test split): ``python -m pipeline.<step>``
  (``pipeline.steps.distill`` for ``distill_student``).

The light tasks (parameter resolution, the gate, promotion, the report) take well under a
second each and are left out. Each task is measured by :mod:`bench.process_measure`: wall
time, CPU time and peak RSS summed over its process tree (the Spark JVM included).

Training runs for at most ``EPOCHS`` epochs (teacher and student, early stopping and refit
as configured): the default 30-epoch budget is for ML-100K, and the point here is how each
task's cost grows with the data, per epoch. The settings are in the results file.

Results go to ``<out>.json`` (every task of every size, scaling ratios, targets),
``<out>.md`` (the tables) and ``<out>.png`` (time per task against events).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from bench.feature_results import machine_info
from bench.features import DS, WINDOW_DAYS, WORK_DIR, ensure_synthetic_logs, world_shape
from bench.process_measure import measure_process
from pipeline import cli
from pipeline.catalog import MANIFEST, Catalog, date_partition
from pipeline.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench.scale")

RESULTS_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_SIZES = (1_000_000, 3_000_000, 10_000_000)
EPOCHS = 2
SETTINGS = (f"teacher.epochs={EPOCHS}", f"student.epochs={EPOCHS}")
TASKS = ("extract_features", "train_teacher", "soft_targets", "distill_student", "evaluate")
MODULES = {"train_teacher": "pipeline.steps.train_teacher", "soft_targets": "pipeline.steps.soft_targets",
           "distill_student": "pipeline.steps.distill", "evaluate": "pipeline.steps.evaluate"}
# Targets of issue 12, reported as met or not.
MAX_PIPELINE_MINUTES_AT_10M = 60
MAX_TASK_RSS_MB = 6 * 1024


def features_home(data_root: Path) -> Path:
    """Where the later steps (``--set`` as below) look for the features: the feature job's ``--out``."""
    cfg = load_config(cli.overrides([f"features.window_days={WINDOW_DAYS}", *SETTINGS]))
    return Catalog(data_root).for_run(DS.isoformat(), cfg).features_home


def task_command(task: str, raw_root: Path, data_root: Path) -> list[str]:
    """The command a user runs for ``task`` on this size's data."""
    if task == "extract_features":
        return [sys.executable, "-m", "spark_jobs.extract_features", "--raw", str(raw_root), "--out", str(features_home(data_root)),
                "--ds", DS.isoformat(), "--window-days", str(WINDOW_DAYS), "--master", "local[2]"]
    sets = [arg for setting in SETTINGS for arg in ("--set", setting)]
    return [sys.executable, "-m", MODULES[task], "--ds", DS.isoformat(), "--data-root", str(data_root),
            "--set", f"features.window_days={WINDOW_DAYS}", *sets]


def run_size(events: int, keep_data: bool) -> dict:
    """Run every task on one size; stop at the first failure (later tasks need its output)."""
    raw_root, data = ensure_synthetic_logs(events)
    data_root = WORK_DIR / f"scale-{events}"
    shutil.rmtree(data_root, ignore_errors=True)
    tasks: dict[str, dict] = {}
    for task in TASKS:
        measured = measure_process(task_command(task, raw_root, data_root), WORK_DIR / "logs" / f"scale-{events}-{task}", REPO_ROOT)
        tasks[task] = {"wall_s": round(measured.wall_s, 1), "cpu_s": round(measured.cpu_s, 1),
                       "peak_rss_mb": round(measured.peak_rss_mb), "returncode": measured.returncode}
        log.info("%d events, %s: wall %.1fs, CPU %.1fs, peak RSS %.0f MB%s", events, task, measured.wall_s, measured.cpu_s,
                 measured.peak_rss_mb, "" if measured.returncode == 0 else " FAILED")
        if measured.returncode != 0:
            tasks[task]["error"] = "\n".join(measured.stderr.strip().splitlines()[-15:])
            break
    manifest = date_partition(features_home(data_root), DS.isoformat()) / MANIFEST
    counts = json.loads(manifest.read_text())["counts"] if manifest.exists() else {}
    if not keep_data:
        shutil.rmtree(data_root, ignore_errors=True)
    return {"data": data, "interactions": sum(counts.get("interactions_by_split", {}).values()), "tasks": tasks,
            "total_wall_s": round(sum(t["wall_s"] for t in tasks.values()), 1), "complete": len(tasks) == len(TASKS)
            and all(t["returncode"] == 0 for t in tasks.values())}


def scaling_and_targets(sizes: dict[int, dict]) -> tuple[dict, list[str]]:
    """Time ratios from the smallest to the largest size, per task, and the targets met or not."""
    done = sorted(n for n, size in sizes.items() if size["complete"])
    scaling, targets = {}, []
    if len(done) >= 2:
        small, large = done[0], done[-1]
        linear = large / small
        for task in TASKS:
            first, last = sizes[small]["tasks"][task], sizes[large]["tasks"][task]
            ratio = last["wall_s"] / max(first["wall_s"], 1e-9)
            # CPU seconds too: steadier than wall time when the shared machine is busy.
            scaling[task] = {"from": small, "to": large, "wall_ratio": round(ratio, 2),
                             "cpu_ratio": round(last["cpu_s"] / max(first["cpu_s"], 1e-9), 2), "linear": linear, "met": ratio <= linear}
        worst = max(scaling.values(), key=lambda s: s["wall_ratio"])
        met = all(s["met"] for s in scaling.values())
        targets.append(f"time per task growing no worse than linearly ({small:,} -> {large:,} events, linear = {linear:.0f}x): "
                       f"worst {worst['wall_ratio']}x {'met' if met else 'NOT met'}")
    if 10_000_000 in sizes:
        size = sizes[10_000_000]
        minutes = size["total_wall_s"] / 60
        verdict = "met" if size["complete"] and minutes <= MAX_PIPELINE_MINUTES_AT_10M else "NOT met"
        targets.append(f"whole pipeline on 10,000,000 events <= {MAX_PIPELINE_MINUTES_AT_10M} min: {minutes:.1f} min "
                       f"{verdict}{'' if size['complete'] else ' (did not complete)'}")
    rss = max(((t["peak_rss_mb"], f"{n:,} events {task}") for n, size in sizes.items() for task, t in size["tasks"].items()), default=None)
    if rss:
        targets.append(f"peak RSS <= {MAX_TASK_RSS_MB:,} MB in every task: highest {rss[0]:,} MB ({rss[1]}) "
                       f"{'met' if rss[0] <= MAX_TASK_RSS_MB else 'NOT met'}")
    return scaling, targets


def render_markdown(results: dict) -> str:
    """The results as Markdown tables."""
    lines = ["# Whole pipeline at scale", "",
             f"{results['date']} · {results['machine']['nproc']} cores, {results['machine']['memory_gb']} GB · ds={DS}, window "
             f"{WINDOW_DAYS} days · settings: {', '.join(SETTINGS)} · one run per size (load average at start "
             f"{results['load_average_at_start']}, at end {results['load_average_at_end']}).", "",
             "Wall seconds per task (CPU seconds, peak RSS MB of the process tree):", "",
             "| events | users | items | interactions | " + " | ".join(TASKS) + " | total wall |",
             "|---:|---:|---:|---:|" + "---:|" * len(TASKS) + "---:|"]
    for events, size in results["sizes"].items():
        cells = []
        for task in TASKS:
            t = size["tasks"].get(task)
            cells.append("-" if t is None else f"{t['wall_s']:.0f} ({t['cpu_s']:.0f} CPU, {t['peak_rss_mb']:,} MB)"
                         + ("" if t["returncode"] == 0 else " FAILED"))
        lines.append(f"| {int(events):,} | {size['data']['users']:,} | {size['data']['items']:,} | {size['interactions']:,} | "
                     + " | ".join(cells) + f" | {size['total_wall_s']:.0f} |")
    if results["scaling"]:
        lines += ["", "Scaling (largest / smallest size; the target is on wall time):", "",
                  "| task | wall ratio | CPU ratio | linear |", "|---|---:|---:|---:|"]
        lines += [f"| {task} | {s['wall_ratio']} | {s.get('cpu_ratio', '-')} | {s['linear']:.0f} |" for task, s in results["scaling"].items()]
    lines += ["", "Targets:", ""] + [f"- {t}" for t in results["targets"]]
    failures = [f"- {int(n):,} events, {task}: {t['error']}" for n, size in results["sizes"].items()
                for task, t in size["tasks"].items() if "error" in t]
    if failures:
        lines += ["", "Failures:", ""] + failures
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Wall time of each task against events, log-log, with a linear-scaling guide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(n) for n in results["sizes"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task in TASKS:
        points = [(n, results["sizes"][str(n)]["tasks"][task]["wall_s"]) for n in sizes if task in results["sizes"][str(n)]["tasks"]]
        if points:
            ax.plot(*zip(*points), marker="o", label=task)
    if sizes:
        first = sizes[0]
        base = max(results["sizes"][str(first)]["tasks"][t]["wall_s"] for t in results["sizes"][str(first)]["tasks"])
        ax.plot(sizes, [base * n / first for n in sizes], linestyle=":", color="grey", label="linear (from the slowest task)")
    ax.set(xscale="log", yscale="log", xlabel="events in the window", ylabel="wall seconds",
           title="Pipeline tasks against events (2 cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; writes ``<out>.json``, ``<out>.md`` and ``<out>.png``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="events per synthetic log")
    parser.add_argument("--keep-data", action="store_true", help="keep each size's pipeline output in bench/work/")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "scale", help="results: <out>.json, .md, .png")
    args = parser.parse_args(argv)
    results = {"benchmark": "scale", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine_info(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
               "settings": {"ds": DS.isoformat(), "window_days": WINDOW_DAYS, "overrides": list(SETTINGS), "spark_master": "local[2]",
                            "world_shapes": {str(n): world_shape(n) for n in args.sizes}},
               "sizes": {}}
    for events in sorted(args.sizes):
        results["sizes"][str(events)] = run_size(events, args.keep_data)
    results["scaling"], results["targets"] = scaling_and_targets({int(n): s for n, s in results["sizes"].items()})
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name(args.out.name + ".json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = render_markdown(results)
    args.out.with_name(args.out.name + ".md").write_text(markdown)
    plot(results, args.out.with_name(args.out.name + ".png"))
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
