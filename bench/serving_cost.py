"""Serving cost of the teacher and every rung of the student ladder as the catalogue grows, through :mod:`pipeline.serving`.

Run as ``.venv/bin/python bench/serving_cost.py [--data-root bench/work/quality]
[--sizes 1682 100000 1000000] [--rounds 10] [--calls 30] [--set ...]`` after a chain run on
ML-100K (``bench/quality.py --dataset ml100k --seeds 42`` leaves one; bench/README.md shows
the chain alone). It takes the teacher and every rung of ``distill.ladder`` that the settings
identify there (the catalogue's lineage) and serves each model's top 100 the one way the
project serves: :class:`pipeline.serving.ServingModel`, the model's real query tower (its
SavedModel; a user known at export is looked up in the query vectors the export stored), then a
faiss index. At each catalogue size:

* the exported catalogue's size (1,682 on ML-100K): the serving index exported with the model;
* any other size: synthetic items of the model's own output width, each a random real item
  vector plus Gaussian noise (the real median nearest-neighbour distance by default, on the
  unit sphere; rescaled to the real item's norm), so the catalogue is families of variants
  around real items; the index is built by :func:`pipeline.serving.build_serving_index` with
  the model's ``cfg.serving`` (exact up to ``serving.ann_exact_max_items`` items, IVF above,
  ``nprobe`` the fewest lists reaching ``serving.ann_target_recall`` on the probe users), saved
  by :func:`pipeline.serving.save_serving_index` (with the export's user query vectors) beside
  a link to the model's SavedModel and loaded by ``ServingModel.load``, so what is timed is
  what would be served.

Users: the export tunes ``nprobe`` on validation users; here a half of the validation users
(shuffled with ``serving.seed``, at most ``serving.ann_probe_users``) are the probe users and
every other user is held out: the timed batches cycle through the held-out users, and
recall@100 is measured on them against exact search over the same items.

Timing: in each of ``--rounds`` rounds, every batch size and model (in an order rotated each
round) is timed for ``--calls`` calls by :func:`pipeline.serving.time_top_k` (after its
warm-up calls), all in one process, 2 TensorFlow and faiss threads; medians over rounds of
each round's p50, p99 and users/s are kept.

The gate: teacher and rungs are evaluated on the test split (no baselines), every rung is
gated against the teacher and the gate's pick is the cheapest to serve that passes
(:mod:`bench.ladder`, ranked by users/s at the exported catalogue, largest batch): the
targets compare it with the teacher. Writes ``serving_cost.json``, ``.md`` and ``.png`` to
``--out`` (``bench/results``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.ladder import gate_ladder, rungs
from bench.quality import DATASETS, DS
from pipeline import cli
from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.data.features import load_user_ids, users_of_split
from pipeline.evaluation import limit_tf_threads
from pipeline.records import ModelMetadata
from pipeline.serving import (RECALL_K, SERVING_INDEX_DIR, ServingModel, build_serving_index, exact_top_k, read_index_record,
                              recall_at_k, save_serving_index, time_top_k)
from pipeline.steps.evaluate import evaluate_run, run_models

REPO_ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
TIMING = ("latency_ms_p50", "latency_ms_p99", "users_per_s")
# The targets for the gate's pick against the teacher, at batch 256: users/s ratio by catalogue size.
SPEED_TARGETS = {"exported": 2.0, 100_000: 3.0, 1_000_000: 2.5}
RECALL_TARGET = 0.95
INDEX_BYTES_TARGET = 4.0


def load_summary() -> dict:
    """``uptime``'s line and the 1, 5 and 15-minute load averages, now."""
    line = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"at": dt.datetime.now().isoformat(timespec="seconds"), "uptime": line, "load_average": list(os.getloadavg())}


def split_users(features_dir: Path, seed: int, max_probes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(probe user ids, held-out user ids)``: a seeded half of the validation users (at most
    ``max_probes``) tune ``nprobe``; every other user is held out for timing and recall."""
    user_ids = load_user_ids(features_dir)
    validation = user_ids[users_of_split(features_dir, "validation")].astype(str)
    shuffled = np.random.default_rng(seed).permutation(validation)
    probes = np.sort(shuffled[:min(len(shuffled) // 2, max_probes)])
    held_out = np.setdiff1d(user_ids[1:].astype(str), probes)
    return probes, held_out


def nearest_neighbour_distance(directions: np.ndarray, block: int = 1024) -> float:
    """Median Euclidean distance from each row of ``directions [n, d]`` (unit norm) to its nearest other row."""
    nearest = []
    for start in range(0, len(directions), block):
        similarity = directions[start:start + block] @ directions.T
        similarity[np.arange(len(similarity)), np.arange(start, start + len(similarity))] = -np.inf
        nearest.append(np.sqrt(np.maximum(2.0 - 2.0 * similarity.max(axis=1), 0.0)))
    return float(np.median(np.concatenate(nearest)))


def synthetic_items(parents: np.ndarray, n: int, spread: float, seed: int) -> np.ndarray:
    """``[n, d]`` float32: random rows of ``parents [m, d]``, their directions moved by noise of
    norm about ``spread`` on the unit sphere, each rescaled to its parent's norm."""
    rng = np.random.default_rng(seed)
    norms = np.linalg.norm(parents, axis=1, keepdims=True)
    picks = rng.integers(len(parents), size=n)
    x = parents[picks] / np.maximum(norms[picks], 1e-12)
    x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(spread / np.sqrt(parents.shape[1]))
    x *= norms[picks] / np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def exact_item_ids(vectors: np.ndarray, item_ids: np.ndarray, queries: np.ndarray, k: int, block: int = 32) -> np.ndarray:
    """``[m, k]`` ids of the exact top ``k`` items of each query, ``block`` queries at a time (bounded memory)."""
    rows = [exact_top_k(vectors, queries[start:start + block], k)[1] for start in range(0, len(queries), block)]
    return item_ids[np.concatenate(rows)]


def served_recall(model: ServingModel, user_ids: np.ndarray, exact_ids: np.ndarray, batch: int = 256) -> float:
    """Recall@K of ``model.top_k`` on ``user_ids`` against ``exact_ids [users, K]``."""
    k = exact_ids.shape[1]
    found = np.concatenate([model.top_k(user_ids[i:i + batch], k)[1] for i in range(0, len(user_ids), batch)])
    return recall_at_k(found, exact_ids)


def serve_at_size(name: str, model_dir: Path, size: int, users: tuple[np.ndarray, np.ndarray], cfg, args,
                  work: Path) -> tuple[ServingModel, dict]:
    """The model served over ``size`` items (its exported index, or synthetic items indexed as the export
    does), and its description: source, width, index record, build seconds, held-out recall@100."""
    probes, held_out = users
    exported = ServingModel.load(model_dir, THREADS)
    vectors = exported.saved_model.item_vectors.numpy()
    ids = exported.saved_model.item_ids.numpy().astype(str)
    row = {"dim": int(vectors.shape[1])}
    if size == len(vectors):
        served, seconds = exported, None
        row["source"] = "exported"
    else:
        directions = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        spread = nearest_neighbour_distance(directions) if args.spread is None else args.spread
        vectors, ids = synthetic_items(vectors, size, spread, args.seed), np.array([f"s{j}" for j in range(size)])
        started = time.perf_counter()
        index, record = build_serving_index(vectors, ids, exported.query_vectors(probes), cfg.serving)
        seconds = time.perf_counter() - started
        home = work / name
        home.mkdir(parents=True)
        (home / "saved_model").symlink_to(exported.files.saved_model.resolve(), target_is_directory=True)
        # The export's table of known users' query vectors goes with the index, as at export.
        known = None if exported.users is None else exported.users.to_numpy().astype(str)
        save_serving_index(home / SERVING_INDEX_DIR, index, ids, record, known, exported.user_vectors)
        del index
        served = ServingModel.load(home, THREADS)
        row.update(source="synthetic", spread=round(spread, 4))
    exact = exact_item_ids(vectors, ids, served.query_vectors(held_out), min(RECALL_K, len(ids)))
    row.update(index=served.record, index_bytes=int(served.record["index_bytes"]),
               build_seconds=None if seconds is None else round(seconds, 1),
               recall_at_100=served_recall(served, held_out, exact))
    print(f"  {name}: {row['source']} {size:,} items, {served.record['type']} index"
          + (f" (nlist {served.record['nlist']}, nprobe {served.record['nprobe']})" if served.record["nlist"] else "")
          + (f", built in {seconds:.0f}s" if seconds is not None else "")
          + f", held-out recall@100 {row['recall_at_100']:.3f}", flush=True)
    return served, row


def measure_size(models: dict[str, Path], size: int, users: tuple[np.ndarray, np.ndarray], cfg, args, work: Path) -> dict:
    """Every model at one catalogue size: served, then timed side by side in interleaved rounds."""
    served, out = {}, {}
    for name, model_dir in models.items():
        served[name], out[name] = serve_at_size(name, model_dir, size, users, cfg, args, work)
    names = list(served)
    rounds = {(name, batch): [] for name in names for batch in args.batch_sizes}
    load_before = load_summary()
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotated: no model always runs first
        for batch in args.batch_sizes:
            for name in order:
                rounds[name, batch].append(time_top_k(served[name], users[1], batch, args.calls, RECALL_K))
    for name in names:
        out[name]["batches"] = {str(batch): {key: statistics.median(t[key] for t in rounds[name, batch]) for key in TIMING}
                                for batch in args.batch_sizes}
        for batch in args.batch_sizes:
            out[name]["batches"][str(batch)]["rounds_users_per_s"] = [round(t["users_per_s"], 1) for t in rounds[name, batch]]
    return {"load_before_timing": load_before, "load_after_timing": load_summary(), "models": out}


def gate_pick(cfg, metrics: dict[str, dict], results: dict) -> dict:
    """The rung the gate would promote given the test ``metrics``, ranked by users/s at the
    exported catalogue's size, largest batch (by parameters where that size was not measured)."""
    at = results["sizes"].get(str(results["exported_size"]), {}).get("models", {})
    speed = {name: row["batches"][str(max(results["batch_sizes"]))]["users_per_s"] for name, row in at.items()}
    return {"metrics": metrics, **gate_ladder(cfg, metrics, speed)}


def ratio(results: dict, size: str, name: str, batch: int) -> float:
    at = results["sizes"][size]["models"]
    return at[name]["batches"][str(batch)]["users_per_s"] / at["teacher"]["batches"][str(batch)]["users_per_s"]


def targets(results: dict) -> list[dict]:
    """The issue's targets for the gate's pick against the teacher: measured value, wanted, met."""
    pick, batch, checks = results["gate"]["chosen"], max(results["batch_sizes"]), []
    for where, wanted in SPEED_TARGETS.items():
        size = str(results["exported_size"] if where == "exported" else where)
        label = f"{int(size):,} items" + (" (ML-100K, exported)" if where == "exported" else "")
        value = ratio(results, size, pick, batch) if size in results["sizes"] else None
        checks.append({"target": f"users/s, {pick} / teacher, batch {batch}, {label}", "wanted": f">= {wanted}x",
                       "value": value, "shown": "not measured" if value is None else f"{value:.2f}x",
                       "met": value is not None and value >= wanted})
    for name in ("teacher", pick):
        recalls = {size: at["models"][name]["recall_at_100"] for size, at in results["sizes"].items()}
        worst = min(recalls, key=recalls.get)
        checks.append({"target": f"held-out recall@100 of {name}, every size", "wanted": f">= {RECALL_TARGET}",
                       "value": recalls[worst], "met": recalls[worst] >= RECALL_TARGET,
                       "shown": ", ".join(f"{v:.3f} at {int(s):,}" for s, v in recalls.items())})
    shrink = {size: at["models"]["teacher"]["index_bytes"] / at["models"][pick]["index_bytes"] for size, at in results["sizes"].items()}
    worst = min(shrink, key=shrink.get)
    checks.append({"target": f"index bytes, teacher / {pick}, every size", "wanted": f">= {INDEX_BYTES_TARGET}x",
                   "value": shrink[worst], "met": shrink[worst] >= INDEX_BYTES_TARGET,
                   "shown": ", ".join(f"{v:.2f}x at {int(s):,}" for s, v in shrink.items())})
    return checks


def query_source(results: dict) -> str:
    """Where the models' query vectors came from: the export's table of known users, or the query tower."""
    rows = [(name, row["index"].get("user_vectors")) for at in results["sizes"].values() for name, row in at["models"].items()]
    if all(count for _, count in rows):
        return "Query vectors: looked up in each export's table of known users (every timed user is known)."
    towers = sorted({name for name, count in rows if not count})
    return f"Query vectors from the SavedModel's query tower for {', '.join(towers)} (exported without a table of user vectors)."


def index_label(record: dict) -> str:
    return "exact" if record["type"] == "exact" else f"IVF {record['nlist']:,} lists, nprobe {record['nprobe']}"


def write_markdown(results: dict, path: Path) -> None:
    """The tables: every model and size; ratios to the teacher; the gate's pick; the targets."""
    batches, gate = results["batch_sizes"], results["gate"]
    start, end = results["load"]["start"], results["load"]["end"]
    lines = [f"Top-{RECALL_K} serving cost through `pipeline.serving` (query vectors, then the faiss index), {results['dataset']} "
             f"models of seed {results['seed']} (commit {results['commit'][:7]}), measured {start['at']} to {end['at']}: "
             f"medians of {results['rounds']} interleaved rounds of {results['calls']} timed calls per model and batch size, "
             f"{results['threads']} threads. Load averages (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in start['load_average'])} "
             f"at the start, {', '.join(f'{v:.2f}' for v in end['load_average'])} at the end; 1-minute load before and after "
             "each size's timed rounds: " + ", ".join(f"{int(size):,} items {at['load_before_timing']['load_average'][0]:.2f} -> "
                                                      f"{at['load_after_timing']['load_average'][0]:.2f}" for size, at in results["sizes"].items())
             + f". Probe users (tune nprobe) {results['users']['probe']}, held-out users (timed, recall) {results['users']['held_out']}. "
             + query_source(results), "",
             "| items | model | d | index | held-out recall@100 | index MB | "
             + " | ".join(f"batch {b}: p50 / p99 ms | batch {b}: users/s" for b in batches) + " | build s |",
             "|---:|---|---:|---|---:|---:|" + "---:|---:|" * len(batches) + "---:|"]
    for size, at in results["sizes"].items():
        for name, row in at["models"].items():
            cells = [f"{row['batches'][str(b)]['latency_ms_p50']:.2f} / {row['batches'][str(b)]['latency_ms_p99']:.2f} | "
                     f"{row['batches'][str(b)]['users_per_s']:,.0f}" for b in batches]
            lines.append(f"| {int(size):,} ({row['source']}) | {name} | {row['dim']} | {index_label(row['index'])} | "
                         f"{row['recall_at_100']:.3f} | {row['index_bytes'] / 1e6:,.2f} | " + " | ".join(cells)
                         + f" | {row['build_seconds'] if row['build_seconds'] is not None else 'at export'} |")
    lines += ["", "Ratios to the teacher (users/s: the model's over the teacher's; index bytes: the teacher's over the model's):", "",
              "| items | model | " + " | ".join(f"users/s, batch {b}" for b in batches) + " | index bytes |",
              "|---:|---|" + "---:|" * (len(batches) + 1)]
    for size, at in results["sizes"].items():
        for name in at["models"]:
            if name != "teacher":
                shrink = at["models"]["teacher"]["index_bytes"] / at["models"][name]["index_bytes"]
                lines.append(f"| {int(size):,} | {name} | " + " | ".join(f"{ratio(results, size, name, b):.2f}x" for b in batches)
                             + f" | {shrink:.2f}x |")
    lines += ["", f"The gate (test split, the pipeline's thresholds, no champion): {gate['decision']} for **{gate['chosen']}**; "
              f"{gate['why']}.", "", "| model | NDCG@10 | Recall@20 | params | gate |", "|---|---:|---:|---:|---|"]
    decisions = {row["name"]: row for row in gate["ladder"]}
    for name, m in gate["metrics"].items():
        verdict = "" if name not in decisions else decisions[name]["decision"] + "".join(f"; {r}" for r in decisions[name]["reasons"])
        lines.append(f"| {name} | {m['ndcg@10']:.4f} | {m['recall@20']:.4f} | {m.get('trainable_params', 0):,} | {verdict} |")
    lines += ["", "Targets (the gate's pick against the teacher):", "", "| target | measured | wanted | met |", "|---|---|---|---|"]
    verdict = lambda t: "met" if t["met"] else "not measured" if t["value"] is None else "**NOT met**"  # noqa: E731
    lines += [f"| {t['target']} | {t['shown']} | {t['wanted']} | {verdict(t)} |" for t in results["targets"]]
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    """Users/s against catalogue size per model (left) and each rung's ratio to the teacher (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(s) for s in results["sizes"]]
    names = list(results["sizes"][str(sizes[0])]["models"])
    colours = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = dict(zip(results["batch_sizes"], ("--", "-", ":")))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in names:
        dim = results["sizes"][str(sizes[0])]["models"][name]["dim"]
        label = f"{name} ({dim}-d)" + (" gate's pick" if name == results["gate"]["chosen"] else "")
        for batch, style in styles.items():
            ys = [results["sizes"][str(s)]["models"][name]["batches"][str(batch)]["users_per_s"] for s in sizes]
            left.plot(sizes, ys, style, marker="o", color=colours[name], label=f"{label}, batch {batch}")
            if name != "teacher":
                right.plot(sizes, [ratio(results, str(s), name, batch) for s in sizes], style, marker="o", color=colours[name],
                           label=f"{label}, batch {batch}")
    wanted = {(results["exported_size"] if k == "exported" else k): v for k, v in SPEED_TARGETS.items()}
    right.scatter(list(wanted), list(wanted.values()), marker="x", color="black", zorder=3, label="target (batch 256)")
    right.axhline(1.0, color="grey", linewidth=0.8)
    left.set(xscale="log", yscale="log", xlabel="catalogue size (items)", ylabel="users/s (median over rounds)",
             title=f"top-{RECALL_K} through pipeline.serving")
    right.set(xscale="log", xlabel="catalogue size (items)", ylabel="users/s / teacher's", title="ratio to the teacher")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO_ROOT / "bench" / "work" / "quality"))
    parser.add_argument("--ds", default=DS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1682, 100_000, 1_000_000],
                        help="catalogue sizes; the exported catalogue's own size serves the exported index")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (medians over them are kept)")
    parser.add_argument("--calls", type=int, default=30, help="timed calls per model, batch size and round")
    parser.add_argument("--spread", type=float, default=None,
                        help="noise norm of a synthetic item's direction (default: the real median nearest-neighbour distance)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic items")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    parser.add_argument("--work", default=str(REPO_ROOT / "bench" / "work"), help="where synthetic indexes are saved while measured")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON", help="the settings the models were trained with")
    args = parser.parse_args(argv)
    started, load_start = time.perf_counter(), load_summary()
    limit_tf_threads(THREADS)
    window = [f"features.window_days={DATASETS['ml100k']['window_days']}"] if args.ds == DS else []
    catalog, cfg = Catalog(Path(args.data_root)), load_config(cli.overrides(window + args.set))
    models = {name: path for name, path in run_models(args.ds, catalog, cfg).items() if name == "teacher" or name in rungs(cfg)}
    features_dir = catalog.features(args.ds)
    users = split_users(features_dir, cfg.serving.seed, cfg.serving.ann_probe_users)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()
    results = {"dataset": "ML-100K" if args.ds == DS else args.ds, "ds": args.ds, "seed": cfg.training.seed, "commit": commit,
               "models": {name: {"path": str(path), "trainable_params": ModelMetadata.load(path).trainable_params}
                          for name, path in models.items()},
               "exported_size": int(read_index_record(models["teacher"])["items"]),
               "serving": cfg.to_dict()["serving"], "batch_sizes": args.batch_sizes, "rounds": args.rounds, "calls": args.calls,
               "threads": THREADS, "spread": args.spread, "synthetic_seed": args.seed,
               "users": {"probe": len(users[0]), "held_out": len(users[1])}, "sizes": {}}
    # Quality first (not timed): a run that cannot be gated stops before the long part.
    metrics = evaluate_run(args.ds, catalog, cfg, models, baselines=False, latency=False)["models"]
    Path(args.work).mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.work, prefix="serving_cost_") as work:
            size_started = time.perf_counter()
            print(f"{size:,} items:", flush=True)
            results["sizes"][str(size)] = measure_size(models, size, users, cfg, args, Path(work))
            results["sizes"][str(size)]["seconds"] = round(time.perf_counter() - size_started, 1)
            print(f"{size:,} items measured in {results['sizes'][str(size)]['seconds']:.0f}s", flush=True)
    results["load"] = {"start": load_start, "end": load_summary()}
    results["gate"] = gate_pick(cfg, metrics, results)
    results["targets"] = targets(results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving_cost.json").write_text(json.dumps(results, indent=2, default=str))
    write_markdown(results, out / "serving_cost.md")
    plot(results, out / "serving_cost.png")
    print((out / "serving_cost.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
