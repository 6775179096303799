"""Serving cost of the exported teacher and students, measured side by side.

Run as ``.venv/bin/python bench/latency.py [--data-root bench/work/quality] [--rounds 5]
[--set ...]`` after ``bench/quality.py``: it takes the teacher, distilled student and plain
student that the settings identify there (the catalogue's lineage) and times batched top-100 queries in interleaved rounds
(teacher, student, plain, teacher, ...) in one process, so that machine noise falls on
all of them alike. Medians over rounds go to ``bench/results/latency_ml100k.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
from pathlib import Path

from bench.quality import DS
from pipeline import cli
from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.data.features import load_user_table
from pipeline.evaluation import directory_bytes, limit_tf_threads, measure_latency
from pipeline.steps.evaluate import run_models

REPO_ROOT = Path(__file__).resolve().parents[1]


def stage_times(saved_model: Path, users, batch: int = 1024, repeats: int = 20) -> dict:
    """Median ms of the serving call and of the parts of exact retrieval: query tower, scoring every item, top-100."""
    import time

    import numpy as np
    import tensorflow as tf

    model = tf.saved_model.load(str(saved_model))
    ids = tf.constant(np.resize(users, batch).astype(str))
    queries = model.query_model(ids)
    parts = {
        "full_call": lambda: model(ids),
        "query_tower": lambda: model.query_model(ids),
        "scoring_matmul": lambda: tf.matmul(queries, model.item_vectors, transpose_b=True),
        "top_100": lambda: tf.math.top_k(tf.matmul(queries, model.item_vectors, transpose_b=True), 100),
    }
    out = {}
    for name, call in parts.items():
        call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = call()
            for tensor in result if isinstance(result, (tuple, list)) else [result]:
                tensor.numpy()
            times.append(time.perf_counter() - start)
        out[name] = round(1000 * float(np.median(times)), 2)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO_ROOT / "bench" / "work" / "quality"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON", help="the settings the models were trained with")
    args = parser.parse_args(argv)
    limit_tf_threads()
    catalog, cfg = Catalog(Path(args.data_root)), load_config(cli.overrides(args.set))
    models = {name: path / "saved_model" for name, path in run_models(DS, catalog, cfg, plain=True).items()}
    users = load_user_table(catalog.features(DS)).user_ids[1:]
    results = {"load_average_start": os.getloadavg(), "rounds": args.rounds, "models": {}}
    for batch in args.batch_sizes:
        timing = dataclasses.replace(cfg.evaluate, latency_batch_size=batch, latency_repeats=30)
        runs = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, path in models.items():
                runs[name].append(measure_latency(path, users, timing))
        for name, measured in runs.items():
            row = results["models"].setdefault(name, {"saved_model_bytes": directory_bytes(models[name]), "path": str(models[name])})
            row[f"batch_{batch}"] = {key: statistics.median(m[key] for m in measured)
                                     for key in ("latency_ms_p50", "latency_ms_p99", "throughput_users_per_s")}
        teacher = results["models"]["teacher"][f"batch_{batch}"]["throughput_users_per_s"]
        for name in (n for n in models if n.startswith("student")):  # every rung of the ladder and the plain student
            row = results["models"][name][f"batch_{batch}"]
            row["throughput_vs_teacher"] = row["throughput_users_per_s"] / teacher
    results["stages_ms_batch_1024"] = {name: stage_times(path, users) for name, path in models.items()}
    results["load_average_end"] = os.getloadavg()
    out = REPO_ROOT / "bench" / "results" / "latency_ml100k.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"{'model':14}{'batch':>7}{'p50 ms':>9}{'p99 ms':>9}{'users/s':>10}{'x teacher':>11}")
    for name, row in results["models"].items():
        for batch in args.batch_sizes:
            r = row[f"batch_{batch}"]
            print(f"{name:14}{batch:7d}{r['latency_ms_p50']:9.2f}{r['latency_ms_p99']:9.2f}{r['throughput_users_per_s']:10.0f}"
                  f"{r.get('throughput_vs_teacher', 1.0):11.2f}")
    print("stages at batch 1024 (ms):", json.dumps(results["stages_ms_batch_1024"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
