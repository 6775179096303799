"""Choose the distillation settings on the validation split only.

Run as ``.venv/bin/python bench/tune_distill.py [--seed 42] [--set ...]``. On ML-100K (the
features of ``bench/quality.py``) it trains the teacher once, writes its soft targets, then
trains one student per point of a grid over ``alpha``, ``beta`` and ``distill_temperature``
plus the plain student, and ranks them by validation NDCG@10 (Recall@20 as tie-breaker).
Test metrics are never computed here. Writes ``bench/results/distill_search.json`` and
``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
from pathlib import Path

from bench.quality import DS, prepare_features
from pipeline import cli
from pipeline.catalog import Catalog
from pipeline.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]

GRID = {"alpha": (0.0, 0.2, 0.5), "beta": (0.0, 0.1), "distill_temperature": (1.0, 2.0, 4.0)}


def main(argv=None) -> int:
    from pipeline.steps.distill import distill_student
    from pipeline.steps.soft_targets import generate_soft_targets
    from pipeline.steps.train_teacher import train_teacher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-root", default=str(REPO_ROOT / "bench" / "work" / "quality"))
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "distill_search"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON")
    args = parser.parse_args(argv)
    catalog = Catalog(Path(args.data_root))
    prepare_features(catalog)
    cfg = load_config(cli.overrides(args.set + [f"training.seed={args.seed}"]))
    teacher = train_teacher(DS, catalog, cfg, reuse=True)
    generate_soft_targets(DS, catalog, cfg)
    rows = []
    plain = distill_student(DS, catalog, cfg.plain_student(), role="student_plain")
    rows.append({"alpha": 1.0, "beta": 0.0, "distill_temperature": None, **plain["metrics"]["validation"], "epochs": plain["epochs"]})
    for alpha, beta, temperature in itertools.product(*GRID.values()):
        point = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, alpha=alpha, beta=beta, distill_temperature=temperature))
        student = distill_student(DS, catalog, point)
        rows.append({"alpha": alpha, "beta": beta, "distill_temperature": temperature, **student["metrics"]["validation"],
                     "epochs": student["epochs"]})
        logging.info("alpha %.1f beta %.1f T %.0f: validation ndcg@10 %.4f recall@20 %.4f", alpha, beta, temperature,
                     rows[-1]["ndcg@10"], rows[-1]["recall@20"])
    ranked = sorted(rows[1:], key=lambda r: (r["ndcg@10"], r["recall@20"]), reverse=True)
    payload = {"split": "validation", "seed": args.seed, "grid": GRID, "overrides": args.set,
               "teacher": {"version": teacher["version"], "validation": teacher["metrics"]["validation"]},
               "plain_student": rows[0], "best": ranked[0], "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    lines = [f"Distillation settings on the ML-100K **validation** split, seed {args.seed} (`bench/tune_distill.py`); "
             f"teacher validation NDCG@10 {teacher['metrics']['validation']['ndcg@10']:.4f}, "
             f"Recall@20 {teacher['metrics']['validation']['recall@20']:.4f}.", "",
             "| alpha | beta | T | NDCG@10 | Recall@20 | epochs |", "|---:|---:|---:|---:|---:|---:|"]
    for row in [rows[0]] + ranked:
        t = "plain" if row["distill_temperature"] is None else f"{row['distill_temperature']:g}"
        lines.append(f"| {row['alpha']:g} | {row['beta']:g} | {t} | {row['ndcg@10']:.4f} | {row['recall@20']:.4f} | {row['epochs']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
