"""Why the narrow student is not much cheaper to serve under IVF: recall@100 and time against probe depth.

Run as ``.venv/bin/python bench/probe_curve.py [--data-root bench/work/quality] [--sizes 100000]
[--rounds 7] [--set ...]`` after a chain run on ML-100K (as for ``bench/serving_cost.py``).

For the teacher and every rung of ``distill.ladder`` it builds the catalogue of each size the way
``bench/serving_cost.py`` does (synthetic variants of the model's own exported item vectors), one
``IndexIVFFlat`` per model at :func:`pipeline.serving.auto_nlist` lists (the export's rule), and
then, for every probe depth of :func:`pipeline.serving.probe_steps` up to ``--max-nprobe``:
recall@100 against exact search on the held-out users (the users ``bench/serving_cost.py`` holds
out) and the median milliseconds of one faiss search of 256 of them, timed in ``--rounds``
rounds interleaved across models and depths (2 threads). Then, per model, the fewest probes that
reach recall@100 0.95 and what they cost, which is what the export would serve.

Writes ``probe_curve.json`` and ``.md`` to ``--out`` (``bench/results``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import time
from pathlib import Path

import faiss
import numpy as np

from bench.ladder import rungs
from bench.quality import DATASETS, DS
from bench.serving_cost import exact_item_ids, load_summary, nearest_neighbour_distance, split_users, synthetic_items
from pipeline import cli
from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.serving import RECALL_K, ServingModel, auto_nlist, probe_steps, recall_at_k
from pipeline.steps.evaluate import run_models

REPO_ROOT = Path(__file__).resolve().parents[1]
THREADS, BATCH, TARGET = 2, 256, 0.95


def curve(models: dict[str, Path], size: int, users: tuple[np.ndarray, np.ndarray], cfg, args) -> dict:
    """Every model's IVF index over ``size`` synthetic items: recall and search time per probe depth."""
    built = {}
    for name, model_dir in models.items():
        served = ServingModel.load(model_dir, THREADS)
        vectors = served.saved_model.item_vectors.numpy()
        directions = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        vectors = synthetic_items(vectors, size, nearest_neighbour_distance(directions), args.seed)
        queries = np.ascontiguousarray(served.query_vectors(users[1][:BATCH]))
        exact = exact_item_ids(vectors, np.arange(size), queries, RECALL_K)
        nlist = auto_nlist(size)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(vectors.shape[1]), vectors.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = cfg.serving.seed
        started = time.perf_counter()
        index.train(vectors)
        index.add(vectors)
        steps = [p for p in probe_steps(nlist) if p <= args.max_nprobe]
        recalls = {}
        for nprobe in steps:
            index.nprobe = nprobe
            recalls[nprobe] = recall_at_k(index.search(queries, RECALL_K)[1], exact)
        built[name] = (index, queries, steps, recalls)
        print(f"  {name}: {vectors.shape[1]}-d, {size:,} items, {nlist} lists, built in {time.perf_counter() - started:.0f}s; "
              + ", ".join(f"{p}: {r:.3f}" for p, r in recalls.items()), flush=True)
    times = {(name, p): [] for name, (_, _, steps, _) in built.items() for p in steps}
    for r in range(args.rounds):
        for name, (index, queries, steps, _) in (list(built.items())[r % len(built):] + list(built.items())[:r % len(built)]):
            for nprobe in steps:
                index.nprobe = nprobe
                index.search(queries, RECALL_K)  # warm
                started = time.perf_counter()
                index.search(queries, RECALL_K)
                times[name, nprobe].append((time.perf_counter() - started) * 1000.0)
    out = {}
    for name, (index, _, steps, recalls) in built.items():
        rows = [{"nprobe": p, "recall_at_100": recalls[p], "ms_per_256": statistics.median(times[name, p])} for p in steps]
        enough = [row for row in rows if row["recall_at_100"] >= TARGET]
        out[name] = {"dim": index.d, "nlist": index.nlist, "curve": rows, "at_target": enough[0] if enough else None}
    return out


def write_markdown(results: dict, path: Path) -> None:
    lines = [f"IVF probe depth against recall@100 (held-out users, against exact search) and the time of one faiss search of "
             f"{BATCH} users (median of {results['rounds']} interleaved rounds, {THREADS} threads), ML-100K models of seed "
             f"{results['seed']} (commit {results['commit']}), synthetic catalogues as in `bench/serving_cost.py`; "
             f"{results['started']} to {results['finished']}; load averages {results['load_before']['load_average']} before, "
             f"{results['load_after']['load_average']} after (`bench/probe_curve.py`).", ""]
    for size, models in results["sizes"].items():
        names = list(models)
        lines += [f"**{int(size):,} items** ({models[names[0]]['nlist']:,} lists):", "",
                  "| nprobe | " + " | ".join(f"{n} ({models[n]['dim']}-d): recall / ms" for n in names) + " |",
                  "|---:|" + "---:|" * len(names)]
        depths = sorted({row["nprobe"] for n in names for row in models[n]["curve"]})
        for p in depths:
            cells = [next((f"{r['recall_at_100']:.3f} / {r['ms_per_256']:.2f}" for r in models[n]["curve"] if r["nprobe"] == p), "–")
                     for n in names]
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        teacher = models["teacher"]["at_target"]
        lines += ["", f"Fewest probes reaching recall@100 {TARGET} (what the export serves):", ""]
        for n in names:
            at = models[n]["at_target"]
            if at is None:
                lines.append(f"- {n}: not reached within {results['max_nprobe']} probes")
                continue
            speed = "" if n == "teacher" or teacher is None else f"; {teacher['ms_per_256'] / at['ms_per_256']:.2f}x the teacher's users/s"
            lines.append(f"- {n}: {at['nprobe']} probes, recall {at['recall_at_100']:.3f}, {at['ms_per_256']:.2f} ms{speed}")
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO_ROOT / "bench" / "work" / "quality"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--max-nprobe", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic items (as bench/serving_cost.py)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(THREADS)
    catalog = Catalog(Path(args.data_root))
    cfg = load_config(cli.overrides([f"features.window_days={DATASETS['ml100k']['window_days']}", *args.set]))
    models = {name: path for name, path in run_models(DS, catalog, cfg).items() if name == "teacher" or name in rungs(cfg)}
    users = split_users(catalog.features(DS), cfg.serving.seed, cfg.serving.ann_probe_users)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()
    results = {"seed": cfg.training.seed, "commit": commit, "rounds": args.rounds, "max_nprobe": args.max_nprobe,
               "started": dt.datetime.now().isoformat(timespec="seconds"), "load_before": load_summary(), "sizes": {}}
    for size in args.sizes:
        results["sizes"][str(size)] = curve(models, size, users, cfg, args)
    results.update(finished=dt.datetime.now().isoformat(timespec="seconds"), load_after=load_summary())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_curve.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out / "probe_curve.md")
    print((out / "probe_curve.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
