"""Benchmark the whole pipeline on synthetic logs of growing size: wall time, CPU and peak RSS per task.

Run as ``make bench-scale`` (installs the benchmark requirements first), or
``.venv/bin/python bench/scale.py [--sizes 1000000 3000000 10000000] [--out bench/results/scale]``.

For each size it generates a synthetic raw log once (under ``bench/work/``, users and items
growing with the events: :func:`bench.features.world_shape`), then runs the DAG's heavy
tasks one after the other, each as its own process exactly as a user runs it by hand:

* ``extract_features``: the Spark job, GX validation on, ``local[2]``;
* ``train_teacher``, ``soft_targets``, one ``distill_student`` per rung of the student ladder
  (``distill_student@5%``, ...; the DAG's mapped task), ``evaluate`` (teacher, every rung,
  MostPopular and both ALS baselines on the test split): ``python -m pipeline.<step>``
  (``pipeline.steps.distill`` for ``distill_student``).

The light tasks (parameter resolution, the gate, promotion, the report) take well under a
second each and are left out. Each task is measured by :mod:`bench.process_measure`: wall
time, CPU time and peak RSS summed over its process tree (the Spark JVM included).

``--training budget`` (the default) caps training at ``EPOCH_BUDGET`` epochs (teacher and
student, early stopping and refit as configured): the point is how each task's cost grows
with the data, per epoch. ``--training default`` trains as the product does by default (early
stopping on validation within the 30-epoch budget, then the refit).

``--nights N`` runs N consecutive dates ending at the log's last day in one data root, as the
nightly DAG would: the first night starts cold, each later one warm from the night before
(``training.warm_start``, the product's default), so a night's time shows what warm start
saves at that size. Each night's models (epochs run, where they started) and test NDCG@10 are
in the results. The settings are in the results file.

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
from typing import Callable, Sequence

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
EPOCH_BUDGET = 2
TRAINING = {"budget": (f"teacher.epochs={EPOCH_BUDGET}", f"student.epochs={EPOCH_BUDGET}"), "default": ()}
DISTILL = "distill_student"
MODULES = {"train_teacher": "pipeline.steps.train_teacher", "soft_targets": "pipeline.steps.soft_targets",
           DISTILL: "pipeline.steps.distill", "evaluate": "pipeline.steps.evaluate"}
# Targets of issues 12 and 30, reported as met or not.
MAX_PIPELINE_MINUTES_AT_10M = 60
MAX_TASK_RSS_MB = 6 * 1024
# Longest task: a cold teacher at 10M events with the default training runs for hours.
TASK_TIMEOUT_S = 6 * 3600


def run_settings(training: str) -> list[str]:
    """The ``--set`` settings of every step of a run."""
    return [f"features.window_days={WINDOW_DAYS}", *TRAINING[training]]


def run_config(settings: Sequence[str]):
    return load_config(cli.overrides(list(settings)))


def features_home(data_root: Path, ds: str, settings: Sequence[str]) -> Path:
    """Where the later steps (``--set`` as below) look for the features: the feature job's ``--out``."""
    return Catalog(data_root).for_run(ds, run_config(settings)).features_home


def rung_settings(settings: Sequence[str], share: float | None) -> list[str]:
    """The settings of one rung of the ladder, as the DAG's mapped task trains it (``cfg.rung``)."""
    return [*settings, f"student.max_param_share={json.dumps(share)}", "distill.ladder=[]"]


def night_tasks(ds: str, raw_root: Path, data_root: Path, settings: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``(task, command)`` of one night, in the DAG's order: the commands a user runs by hand."""
    def step(module: str, task_settings: Sequence[str]) -> list[str]:
        sets = [arg for setting in task_settings for arg in ("--set", setting)]
        return [sys.executable, "-m", module, "--ds", ds, "--data-root", str(data_root), *sets]

    cfg = run_config(settings)
    rungs = cfg.ladder_rungs()
    tasks = [("extract_features", [sys.executable, "-m", "spark_jobs.extract_features", "--raw", str(raw_root),
                                   "--out", str(features_home(data_root, ds, settings)), "--ds", ds,
                                   "--window-days", str(WINDOW_DAYS), "--master", "local[2]"]),
             ("train_teacher", step(MODULES["train_teacher"], settings)),
             ("soft_targets", step(MODULES["soft_targets"], settings))]
    tasks += [(DISTILL if len(rungs) == 1 else f"{DISTILL}@{share:.0%}", step(MODULES[DISTILL], rung_settings(settings, share)))
              for share in rungs]
    return tasks + [("evaluate", step(MODULES["evaluate"], settings))]


def night_models(ds: str, data_root: Path, settings: Sequence[str], evaluation: dict | None) -> dict:
    """What each model of a night ran: selection and refit epochs, where it started, test NDCG@10."""
    from pipeline.records import ModelMetadata

    cfg = run_config(settings)
    catalog = Catalog(data_root).for_run(ds, cfg)  # the features where the feature job wrote them
    paths = {"teacher": catalog.teacher(ds, cfg), **{cfg.rung_name(share): catalog.student(ds, cfg.rung(share))
                                                     for share in cfg.ladder_rungs()}}
    models = {}
    for name, path in paths.items():
        if not ModelMetadata.exists(path):
            continue
        meta = ModelMetadata.load(path)
        start = meta.warm_start or {}
        models[name] = {"selection_epochs": len(meta.history), "best_epoch": meta.best_epoch,
                        "refit_epochs": (meta.refit or {}).get("epochs", 0), "seconds": meta.seconds,
                        "start": f"warm from {start['ds']}" if "ds" in start else "cold",
                        "test_ndcg@10": ((evaluation or {}).get("models", {}).get(name) or {}).get("ndcg@10")}
    return models


def run_night(ds: str, raw_root: Path, data_root: Path, settings: Sequence[str], label: str) -> dict:
    """Run every task of one night; stop at the first failure (later tasks need its output)."""
    tasks: dict[str, dict] = {}
    evaluation = None
    for task, command in night_tasks(ds, raw_root, data_root, settings):
        measured = measure_process(command, WORK_DIR / "logs" / f"{label}-{ds}-{task}", REPO_ROOT, TASK_TIMEOUT_S)
        tasks[task] = {"wall_s": round(measured.wall_s, 1), "cpu_s": round(measured.cpu_s, 1),
                       "peak_rss_mb": round(measured.peak_rss_mb), "returncode": measured.returncode}
        log.info("%s %s, %s: wall %.1fs, CPU %.1fs, peak RSS %.0f MB%s", label, ds, task, measured.wall_s, measured.cpu_s,
                 measured.peak_rss_mb, "" if measured.returncode == 0 else " FAILED")
        if measured.returncode != 0:
            tasks[task]["error"] = "\n".join(measured.stderr.strip().splitlines()[-15:])
            break
        if task == "evaluate":
            evaluation = _printed_json(measured.stdout)
    manifest = date_partition(features_home(data_root, ds, settings), ds) / MANIFEST
    counts = json.loads(manifest.read_text())["counts"] if manifest.exists() else {}
    complete = "evaluate" in tasks and all(t["returncode"] == 0 for t in tasks.values())
    return {"ds": ds, "interactions": sum(counts.get("interactions_by_split", {}).values()), "tasks": tasks,
            "total_wall_s": round(sum(t["wall_s"] for t in tasks.values()), 1), "complete": complete,
            "peak_rss_mb": max((t["peak_rss_mb"] for t in tasks.values()), default=0),
            "models": night_models(ds, data_root, settings, evaluation)}


def _printed_json(stdout: str) -> dict | None:
    """The JSON result a step prints last (``pipeline.cli.run_step``), or None."""
    start = stdout.find("{")
    try:
        return json.loads(stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        return None


def run_size(events: int, keep_data: bool, training: str = "budget", nights: int = 1,
             progress: Callable[[dict], None] | None = None) -> dict:
    """Run ``nights`` consecutive nights ending at the log's last day on one size, in one data
    root (the first cold, the later ones warm from the night before). The size's ``tasks`` are
    the first night's (cold), for the scaling table; every night is under ``nights``.
    ``progress`` gets the size's result so far after every night."""
    raw_root, data = ensure_synthetic_logs(events)
    data_root = WORK_DIR / f"scale-{events}"
    shutil.rmtree(data_root, ignore_errors=True)
    settings = run_settings(training)
    runs: list[dict] = []

    def result() -> dict:
        first = runs[0]
        return {"data": data, "interactions": first["interactions"], "tasks": first["tasks"], "total_wall_s": first["total_wall_s"],
                "complete": first["complete"], "nights": list(runs)}

    for back in range(nights - 1, -1, -1):
        runs.append(run_night((DS - dt.timedelta(days=back)).isoformat(), raw_root, data_root, settings, f"scale-{events}"))
        if progress:
            progress(result())
        if not runs[-1]["complete"]:
            break
    if not keep_data:
        shutil.rmtree(data_root, ignore_errors=True)
    return result()


def task_names(sizes: dict) -> list[str]:
    """Every task of the runs, in the order they ran."""
    names: list[str] = []
    for size in sizes.values():
        for night in size.get("nights") or [size]:
            names += [task for task in night["tasks"] if task not in names]
    return names


def scaling_and_targets(sizes: dict[int, dict]) -> tuple[dict, list[str]]:
    """Time ratios from the smallest to the largest size, per task, and the targets met or not."""
    done = sorted(n for n, size in sizes.items() if size["complete"])
    scaling, targets = {}, []
    if len(done) >= 2:
        small, large = done[0], done[-1]
        linear = large / small
        for task in task_names({n: sizes[n] for n in (small, large)}):
            if task not in sizes[small]["tasks"] or task not in sizes[large]["tasks"]:
                continue
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
        for night in (size.get("nights") or [])[1:]:
            minutes = night["total_wall_s"] / 60
            verdict = "met" if night["complete"] and minutes <= MAX_PIPELINE_MINUTES_AT_10M else "NOT met"
            targets.append(f"warm-started night {night['ds']} on 10,000,000 events <= {MAX_PIPELINE_MINUTES_AT_10M} min: "
                           f"{minutes:.1f} min {verdict}{'' if night['complete'] else ' (did not complete)'}")
    rss = max(((t["peak_rss_mb"], f"{n:,} events {night['ds']} {task}") for n, size in sizes.items()
               for night in size.get("nights") or [dict(size, ds=DS.isoformat())] for task, t in night["tasks"].items()), default=None)
    if rss:
        targets.append(f"peak RSS <= {MAX_TASK_RSS_MB:,} MB in every task: highest {rss[0]:,} MB ({rss[1]}) "
                       f"{'met' if rss[0] <= MAX_TASK_RSS_MB else 'NOT met'}")
    return scaling, targets


def render_markdown(results: dict) -> str:
    """The results as Markdown tables."""
    tasks = task_names(results["sizes"])
    overrides = results["settings"]["overrides"]
    lines = ["# Whole pipeline at scale", "",
             f"{results['date']} · {results['machine']['nproc']} cores, {results['machine']['memory_gb']} GB · ds={DS}, window "
             f"{WINDOW_DAYS} days · training: {results['settings'].get('training', 'budget')} "
             f"({', '.join(overrides) or 'the product defaults'}) · one run per size (load average at start "
             f"{results['load_average_at_start']}, at end {results['load_average_at_end']}).", "",
             "Wall seconds per task of the first (cold) night (CPU seconds, peak RSS MB of the process tree):", "",
             "| events | users | items | interactions | " + " | ".join(tasks) + " | total wall |",
             "|---:|---:|---:|---:|" + "---:|" * len(tasks) + "---:|"]
    for events, size in results["sizes"].items():
        cells = []
        for task in tasks:
            t = size["tasks"].get(task)
            cells.append("-" if t is None else f"{t['wall_s']:.0f} ({t['cpu_s']:.0f} CPU, {t['peak_rss_mb']:,} MB)"
                         + ("" if t["returncode"] == 0 else " FAILED"))
        lines.append(f"| {int(events):,} | {size['data']['users']:,} | {size['data']['items']:,} | {size['interactions']:,} | "
                     + " | ".join(cells) + f" | {size['total_wall_s']:.0f} |")
    if any(len(size.get("nights") or []) > 1 for size in results["sizes"].values()):
        lines += ["", "Night by night (each night's wall seconds per task; each model's selection epochs (best) + "
                  "refit epochs, where it started, test NDCG@10):", "",
                  "| events | night | total wall | peak RSS MB | " + " | ".join(tasks) + " | models |",
                  "|---:|---|---:|---:|" + "---:|" * len(tasks) + "---|"]
        for events, size in results["sizes"].items():
            for night in size["nights"]:
                cells = [f"{night['tasks'][t]['wall_s']:.0f}" if t in night["tasks"] else "-" for t in tasks]
                models = "; ".join(f"{name} {m['selection_epochs']} ({m['best_epoch']}) + {m['refit_epochs']}, {m['start']}, "
                                   + ("-" if m["test_ndcg@10"] is None else f"{m['test_ndcg@10']:.4f}")
                                   for name, m in night["models"].items())
                lines.append(f"| {int(events):,} | {night['ds']} | {night['total_wall_s'] / 60:.1f} min | {night['peak_rss_mb']:,} | "
                             + " | ".join(cells) + f" | {models} |")
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
    for task in task_names(results["sizes"]):
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
    parser.add_argument("--training", choices=sorted(TRAINING), default="budget",
                        help=f"budget: at most {EPOCH_BUDGET} epochs per model; default: the product's default training")
    parser.add_argument("--nights", type=int, default=1, help="consecutive nights per size, the later ones warm-started")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "scale", help="results: <out>.json, .md, .png")
    args = parser.parse_args(argv)
    results = {"benchmark": "scale", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine_info(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
               "settings": {"ds": DS.isoformat(), "window_days": WINDOW_DAYS, "training": args.training, "nights": args.nights,
                            "overrides": list(TRAINING[args.training]), "spark_master": "local[2]",
                            "world_shapes": {str(n): world_shape(n) for n in args.sizes}},
               "sizes": {}}
    for events in sorted(args.sizes):
        def progress(size: dict, events: int = events) -> None:  # after every night: a cut-off run keeps what it finished
            results["sizes"][str(events)] = size
            write_results(results, args.out)

        results["sizes"][str(events)] = run_size(events, args.keep_data, args.training, args.nights, progress)
    print(render_markdown(write_results(results, args.out)))
    return 0


def write_results(results: dict, out: Path) -> dict:
    """Write ``<out>.json``, ``.md`` and ``.png`` of the sizes run so far; return what was written."""
    results = dict(results)
    results["scaling"], results["targets"] = scaling_and_targets({int(n): s for n, s in results["sizes"].items()})
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_name(out.name + ".md").write_text(render_markdown(results))
    plot(results, out.with_name(out.name + ".png"))
    return results


if __name__ == "__main__":
    sys.exit(main())
