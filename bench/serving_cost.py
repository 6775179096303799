"""Serving cost of teacher and distilled student as the catalogue grows: exact brute force (top-K by blocks, and one plain top_k) and IVF.

Run as ``.venv/bin/python bench/serving_cost.py [--data-root bench/work/quality]
[--sizes 1682 100000 1000000] [--rounds 5] [--set ...]`` after ``bench/quality.py`` (or any
chain run): it takes the teacher and distilled student that the settings identify there
(the catalogue's lineage) and, at each catalogue size, serves top-``serving.top_k`` queries
with each model's real query tower against

* a size equal to the exported catalogue: the exported item vectors (1,682 on ML-100K);
* any other size: synthetic items of the model's own output width, each a random real
  item vector plus Gaussian noise of norm about ``--spread``, L2-normalised, so the
  catalogue is clustered around real items and the real queries' neighbours are families
  of variants (what an IVF index partitions). By default the spread is the model's median
  distance from a real item to its nearest other item: variants lie as close to their item
  as real neighbours do, on each model's own scale.

Every index is built by :func:`pipeline.modeling.retrieval.build_index` with ``cfg.serving`` (the
export's code path; ``--probe-partitions`` overrides the probe without changing which models are found), saved and loaded as SavedModels, so what is timed is what is served.
Batched calls are timed by :func:`pipeline.evaluation.measure_latency` in interleaved rounds
(teacher: IVF, brute force, brute force with one top_k; student: the same; teacher IVF, ...) in one
process, and medians over rounds of p50/p99 latency and users/s are kept. IVF recall@K is
measured against exact top-K over all users. Writes ``serving_cost.json``, ``.md`` and
``.png`` to ``--out`` (``bench/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.quality import DS
from pipeline import cli
from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.data.features import load_user_table
from pipeline.evaluation import directory_bytes, limit_tf_threads, measure_latency
from pipeline.steps.evaluate import run_models

REPO_ROOT = Path(__file__).resolve().parents[1]

MODELS = ("teacher", "student_kd")
# Index kind -> its serving settings over cfg.serving: the exact brute force as exported
# (top-K by blocks from about 10k items), the same with one top_k over every item, and IVF.
INDEXES = {"ivf": {"index": "ivf"}, "brute_force": {"index": "brute_force"},
           "brute_force_one_top_k": {"index": "brute_force", "block_size": 1}}
METRICS = ("latency_ms_p50", "latency_ms_p99", "throughput_users_per_s")


def synthetic_items(parents: np.ndarray, n: int, spread: float, seed: int) -> np.ndarray:
    """``[n, d]`` float32 unit vectors: random rows of ``parents [m, d]`` plus noise of norm about ``spread``."""
    rng = np.random.default_rng(seed)
    dim = parents.shape[1]
    x = parents[rng.integers(len(parents), size=n)]
    x += rng.standard_normal((n, dim), dtype=np.float32) * np.float32(spread / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def nearest_neighbour_distance(vectors: np.ndarray, block: int = 1024) -> float:
    """Median Euclidean distance from each row of ``vectors [n, d]`` (unit norm) to its nearest other row."""
    nearest = []
    for start in range(0, len(vectors), block):
        similarity = vectors[start:start + block] @ vectors.T
        similarity[np.arange(len(similarity)), np.arange(start, start + len(similarity))] = -np.inf
        nearest.append(np.sqrt(np.maximum(2.0 - 2.0 * similarity.max(axis=1), 0.0)))
    return float(np.median(np.concatenate(nearest)))


def exact_top_k(queries: np.ndarray, items: np.ndarray, k: int, block: int = 64) -> np.ndarray:
    """``[B, k]`` rows of the ``k`` best items per query (unordered), ``block`` queries at a time."""
    out = []
    for start in range(0, len(queries), block):
        scores = queries[start:start + block] @ items.T
        out.append(np.argpartition(-scores, k - 1, axis=1)[:, :k])
    return np.concatenate(out)


def recall_vs_exact(index_dir: Path, users: np.ndarray, items: np.ndarray, item_ids: np.ndarray, batch: int) -> float:
    """Mean over ``users`` of |served top-K ∩ exact top-K| / K for the SavedModel at ``index_dir``."""
    import tensorflow as tf

    model = tf.saved_model.load(str(index_dir))
    served = np.concatenate([model(tf.constant(users[i:i + batch]))[1].numpy() for i in range(0, len(users), batch)])
    k = served.shape[1]
    queries = np.concatenate([model.query_model(tf.constant(users[i:i + batch])).numpy()
                              for i in range(0, len(users), batch)])
    exact = item_ids[exact_top_k(queries, items, k)]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(served.astype(str), exact)]))


def build_indexes(exported: Path, size: int, work: Path, serving, example_ids: np.ndarray, spread: float | None,
                  seed: int) -> dict:
    """Build, save and describe the IVF and brute-force indexes of one model at one size."""
    import tensorflow as tf

    from pipeline.modeling.retrieval import build_index, save_index

    model = tf.saved_model.load(str(exported))
    vectors, ids = model.item_vectors.numpy(), model.item_ids.numpy().astype(str)
    built = {"source": "exported", "dim": int(vectors.shape[1])}
    if size != len(vectors):
        spread = nearest_neighbour_distance(vectors) if spread is None else spread
        vectors, ids = synthetic_items(vectors, size, spread, seed), np.array([f"s{j}" for j in range(size)])
        built.update(source="synthetic", spread=round(spread, 4))
    built.update(vectors=vectors, ids=ids)
    for kind in INDEXES:
        started = time.perf_counter()
        index = build_index(model.query_model, vectors, ids, dataclasses.replace(serving, **INDEXES[kind]))
        seconds = time.perf_counter() - started
        path = save_index(index, example_ids, work / kind)
        row = {"path": path, "build_seconds": round(seconds, 2), "saved_model_bytes": directory_bytes(path)}
        if kind == "ivf":
            row.update(partitions=int(index.centroids.shape[0]), max_partition=int(index.partition_vectors.shape[1]),
                       probe=min(serving.probe_partitions, int(index.centroids.shape[0])))
        built[kind] = row
    return built


def measure_size(models: dict[str, Path], size: int, users: np.ndarray, cfg, args, work: Path) -> dict:
    """Every model and index at one catalogue size: build, recall, interleaved latency rounds."""
    built = {name: build_indexes(path / "saved_model", size, work / name, cfg.serving, users[:1], args.spread, args.seed)
             for name, path in models.items()}
    timings = {(name, kind, batch): [] for name in built for kind in INDEXES for batch in args.batch_sizes}
    for _ in range(args.rounds):
        for batch in args.batch_sizes:
            timing = dataclasses.replace(cfg.evaluate, latency_batch_size=batch, latency_repeats=args.repeats)
            for name in built:
                for kind in INDEXES:
                    timings[name, kind, batch].append(measure_latency(built[name][kind]["path"], users, timing))
    out = {}
    for name, b in built.items():
        out[name] = {key: b[key] for key in ("source", "dim", "spread") if key in b}
        for kind in INDEXES:
            row = {key: value for key, value in b[kind].items() if key != "path"}
            for batch in args.batch_sizes:
                row[f"batch_{batch}"] = {key: statistics.median(m[key] for m in timings[name, kind, batch]) for key in METRICS}
            out[name][kind] = row
        out[name]["ivf"]["recall_vs_exact"] = recall_vs_exact(b["ivf"]["path"], users, b["vectors"], b["ids"], max(args.batch_sizes))
    return out


def write_markdown(results: dict, path: Path) -> None:
    batches = results["batch_sizes"]
    head = "| items | model | d | index | recall@K vs exact | " + " | ".join(f"batch {b}: p50 / p99 ms, users/s" for b in batches) + " |"
    lines = [f"Top-{results['top_k']} serving cost (IVF: {results['serving']['num_partitions'] or 'about sqrt(items)'} partitions, "
             f"{results['serving']['probe_partitions']} probed), medians of {results['rounds']} interleaved rounds "
             f"({results['threads']} TF threads, load {results['load_average_start'][0]:.2f} -> {results['load_average_end'][0]:.2f}).",
             "", head, "|" + "---|" * (5 + len(batches))]
    for size, by_model in results["sizes"].items():
        for name, row in by_model.items():
            for kind in INDEXES:
                r = row[kind]
                recall = f"{r['recall_vs_exact']:.3f} (probe {r['probe']}/{r['partitions']})" if kind == "ivf" else "1 (exact)"
                cells = [f"{r[f'batch_{b}']['latency_ms_p50']:.2f} / {r[f'batch_{b}']['latency_ms_p99']:.2f}, "
                         f"{r[f'batch_{b}']['throughput_users_per_s']:,.0f}" for b in batches]
                source = row["source"] + (f", spread {row['spread']:.2f}" if "spread" in row else "")
                lines.append(f"| {int(size):,} ({source}) | {name} | {row['dim']} | {kind} | {recall} | " + " | ".join(cells) + " |")
    lines += ["", "Student throughput over the teacher's (median users/s), same index, and each at its fastest index:", "",
              "| items | batch | " + " | ".join(INDEXES) + " | fastest vs fastest |", "|---|---|" + "---|" * (len(INDEXES) + 1)]
    for size, by_model in results["sizes"].items():
        for b in batches:
            speed = {name: {kind: by_model[name][kind][f"batch_{b}"]["throughput_users_per_s"] for kind in INDEXES} for name in MODELS}
            same = [f"{speed['student_kd'][kind] / speed['teacher'][kind]:.2f}x" for kind in INDEXES]
            best = {name: max(v, key=v.get) for name, v in speed.items()}
            lines.append(f"| {int(size):,} | {b} | " + " | ".join(same) + f" | {speed['student_kd'][best['student_kd']] / speed['teacher'][best['teacher']]:.2f}x "
                         f"({best['student_kd']} vs {best['teacher']}) |")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = results["batch_sizes"]
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    sizes = [int(s) for s in results["sizes"]]
    for ax, batch in zip(axes[0], batches):
        for name, colour in zip(MODELS, ("tab:blue", "tab:orange")):
            for kind, style in zip(INDEXES, ("-o", "--s", ":^")):
                ys = [results["sizes"][str(s)][name][kind][f"batch_{batch}"]["throughput_users_per_s"] for s in sizes]
                ax.plot(sizes, ys, style, color=colour, label=f"{name} ({results['sizes'][str(sizes[0])][name]['dim']}-d), {kind}")
        ax.set(xscale="log", yscale="log", xlabel="catalogue size (items)", ylabel="users/s (median p50)",
               title=f"batch {batch}, top-{results['top_k']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO_ROOT / "bench" / "work" / "quality"))
    parser.add_argument("--ds", default=DS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1682, 100_000, 1_000_000],
                        help="catalogue sizes; the exported catalogue's own size uses its real item vectors")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per model, index and round")
    parser.add_argument("--spread", type=float, default=None,
                        help="noise norm of a synthetic item around its real item (default: the real median nearest-neighbour distance)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic items")
    parser.add_argument("--probe-partitions", type=int, default=None, help="IVF probe (default: the settings')")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    parser.add_argument("--work", default=None, help="where the indexes are saved while measured (default: a temporary directory)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON", help="the settings the models were trained with")
    args = parser.parse_args(argv)
    limit_tf_threads()
    import tensorflow as tf

    catalog, cfg = Catalog(Path(args.data_root)), load_config(cli.overrides(args.set))
    models = {name: path for name, path in run_models(args.ds, catalog, cfg).items() if name in MODELS}
    if args.probe_partitions:
        cfg = dataclasses.replace(cfg, serving=dataclasses.replace(cfg.serving, probe_partitions=args.probe_partitions))
    users = load_user_table(catalog.features(args.ds)).user_ids[1:].astype(str)
    results = {"ds": args.ds, "models": {name: str(path) for name, path in models.items()}, "top_k": cfg.serving.top_k,
               "serving": dataclasses.asdict(cfg.serving), "batch_sizes": args.batch_sizes, "rounds": args.rounds,
               "repeats": args.repeats, "spread": args.spread, "seed": args.seed, "users": len(users),
               "threads": tf.config.threading.get_intra_op_parallelism_threads(), "load_average_start": os.getloadavg(),
               "sizes": {}}
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.work) as work:
            started = time.perf_counter()
            results["sizes"][str(size)] = measure_size(models, size, users, cfg, args, Path(work))
            print(f"{size:,} items measured in {time.perf_counter() - started:.0f}s", flush=True)
    results["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving_cost.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "serving_cost.md")
    plot(results, out / "serving_cost.png")
    print((out / "serving_cost.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
