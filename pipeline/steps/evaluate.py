"""Evaluate a run's models side by side: ``python -m pipeline.steps.evaluate --ds ... [--config ...]``.

Teacher, distilled student (and, when asked, the plain student and the serving champion)
are evaluated **as exported** (their SavedModels) on the same test split, with the
MostPopular and ALS baselines fitted in the same run; then the exported models' serving
cost is measured side by side. The pieces live in :mod:`pipeline.evaluation`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline import cli
from pipeline.catalog import METADATA, Catalog, require
from pipeline.records import ModelMetadata
from pipeline.config import PipelineConfig
from pipeline.data.features import load_item_table, load_user_ids
from pipeline.evaluation import (
    MostPopularScorer,
    SavedModelScorer,
    evaluate_scorer,
    fit_als,
    fit_ease,
    limit_tf_threads,
    measure_latency,
    saved_model_bytes,
)

log = logging.getLogger(__name__)

MODEL_ORDER = ("teacher", "student_kd", "student_plain", "champion", "ease", "ease_refit", "als", "als_refit", "most_popular")
RUNG_PREFIX = "student_kd@"  # the rungs of a student ladder sort after the teacher, by budget


def run_models(ds: str, catalog: Catalog, cfg: PipelineConfig, plain: bool = False) -> dict[str, Path]:
    """The exported models of a run, by name, as the catalogue identifies them.

    Raises:
        ArtifactNotFound: When one of them has not been trained.
    """
    hint = "run the chain (train_teacher, soft_targets, distill) first"
    models = {"teacher": catalog.teacher(ds, cfg),
              **{cfg.rung_name(share): catalog.student(ds, cfg.rung(share)) for share in cfg.ladder_rungs()}}
    if plain:
        models["student_plain"] = catalog.student(ds, cfg.plain_student(), "student_plain")
    return {name: require(path, METADATA, name, hint) for name, path in models.items()}


def evaluate_run(ds: str, catalog: Catalog, cfg: PipelineConfig, exported: Mapping[str, str | Path],
                 champion_dir: str | Path | None = None, spark: Any = None, baselines: bool = True,
                 latency: bool = True) -> dict:
    """Evaluate exported models, champion and baselines on the same test split.

    Args:
        ds: Logical date of the features.
        catalog: Where artifacts live.
        cfg: Settings (``evaluate``; ``training.seed`` seeds ALS).
        exported: Model name -> model directory (``saved_model/`` and ``metadata.json`` inside);
            each must resolve inside the catalogue's allowed root.
        champion_dir: A registry version directory (TF Serving layout), if there is a champion;
            inside the allowed root too.
        spark: A Spark session for ALS (one is started when None).
        baselines: Also score MostPopular and ALS.
        latency: Time batched top-K queries of the exported models, side by side.

    Returns:
        ``{"split": "test", "users": n, "models": {name: metrics + costs}, "seconds": its own wall time}``.

    Raises:
        OutsideDataRoot: When a model directory resolves outside the allowed root.
    """
    started = time.perf_counter()
    exported = {name: catalog.confine(directory) for name, directory in exported.items()}
    champion_dir = catalog.confine(champion_dir) if champion_dir else None
    limit_tf_threads()
    features_dir = catalog.features(ds)
    user_ids, items = load_user_ids(features_dir), load_item_table(features_dir)
    test = lambda scorer: evaluate_scorer(scorer, features_dir, "test", cfg.evaluate)  # noqa: E731
    models: dict[str, dict] = {}
    for name, directory in exported.items():
        saved_model = directory / "saved_model"
        meta = ModelMetadata.load(directory)
        models[name] = {**test(SavedModelScorer(saved_model, user_ids, items.item_ids)),
                        "trainable_params": meta.trainable_params, "saved_model_bytes": saved_model_bytes(saved_model)}
    if champion_dir:
        models["champion"] = {**test(SavedModelScorer(champion_dir, user_ids, items.item_ids)),
                              "version": int(champion_dir.name) if champion_dir.name.isdigit() else str(champion_dir)}
    if baselines:
        models["most_popular"] = test(MostPopularScorer(items.popularity))
        # Parameters from train only, users represented by everything before the test items
        # (as the exported towers' histories are: the scorer folds each user in from train +
        # validation). als_refit also learns from validation: what retraining on the newest
        # interactions would buy.
        models["als"] = test(fit_als(features_dir, cfg.evaluate, cfg.training.seed, spark))
        models["als_refit"] = test(fit_als(features_dir, cfg.evaluate, cfg.training.seed, spark, splits=("train", "validation")))
        # EASE: l2 chosen on validation from a train-only fit; ease_refit also learns from validation, same l2.
        ease = fit_ease(features_dir, cfg.evaluate)  # None above evaluate.ease_max_items (logged why)
        if ease is not None:
            models["ease"] = {**test(ease), "l2": ease.l2}
            refit = fit_ease(features_dir, cfg.evaluate, splits=("train", "validation"), l2=ease.l2)
            models["ease_refit"] = {**test(refit), "l2": refit.l2}
    if latency:
        sample = user_ids[1:]
        for _ in range(2):  # two interleaved rounds, the second (warm) one is kept
            for name, directory in exported.items():
                models[name].update(measure_latency(directory / "saved_model", sample, cfg.evaluate))
    log.info("test metrics:\n%s", format_table(models))
    return {"split": "test", "users": int(next(iter(models.values()))["users"]), "models": models,
            "seconds": round(time.perf_counter() - started, 1)}


def format_table(models: dict[str, dict], columns: Sequence[str] = ("ndcg@10", "recall@20", "recall@10", "ndcg@20", "hitrate@10", "mrr", "coverage@10")) -> str:
    """A fixed-width table of the models' metrics, for logs."""
    header = f"{'model':14}" + "".join(f"{c:>12}" for c in columns) + f"{'params':>10}{'p50 ms':>9}"
    lines = [header]
    def rank(name: str) -> tuple:
        if name.startswith(RUNG_PREFIX):
            return (1, float(name[len(RUNG_PREFIX):].rstrip("%")))
        return (MODEL_ORDER.index(name) if name in MODEL_ORDER else len(MODEL_ORDER), 0.0)

    for name, row in sorted(models.items(), key=lambda item: rank(item[0])):
        values = "".join(f"{row[c]:12.4f}" if isinstance(row.get(c), float) else f"{'-':>12}" for c in columns)
        params = f"{row['trainable_params']:>10,}" if row.get("trainable_params") else f"{'-':>10}"
        latency = f"{row['latency_ms_p50']:9.1f}" if row.get("latency_ms_p50") else f"{'-':>9}"
        lines.append(f"{name:14}{values}{params}{latency}")
    return "\n".join(lines)


def _evaluate_step(ds: str, catalog: Catalog, cfg: PipelineConfig) -> dict:
    plain = ModelMetadata.exists(catalog.student(ds, cfg.plain_student(), "student_plain"))
    return evaluate_run(ds, catalog, cfg, run_models(ds, catalog, cfg, plain=plain))


def main(argv=None) -> int:
    return cli.run_step(_evaluate_step, "Evaluate teacher, students and baselines on the test split.", argv)


if __name__ == "__main__":
    raise SystemExit(main())
