"""Train the teacher and export it: ``python -m pipeline.steps.train_teacher --ds ... [--config ...]``.

Writes the catalogue's teacher directory atomically: ``saved_model/`` (top-K for a batch
of user ids), ``checkpoint/`` (weights, for soft targets), ``tensorboard/`` (the training's
per-epoch scalars) and ``metadata.json``; a teacher refitted on train + validation also
keeps its selection run's weights (train only) in ``checkpoint_selection/``, named by its
metadata, for the soft targets a student's own selection run learns from and for tomorrow's
warm-started selection run. The
version is the teacher's identity (features, ``training``, ``teacher`` and ``serving``
settings), so re-running the same ``ds`` and settings rewrites the same version.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from pipeline import cli
from pipeline.catalog import TENSORBOARD, Catalog
from pipeline.config import PipelineConfig
from pipeline.data.features import load_item_table, load_user_table, read_manifest, users_of_split, with_history_before_test
from pipeline.io import atomic_dir
from pipeline.modeling.models import build_teacher, export_retrieval
from pipeline.modeling.training import CHECKPOINT, SELECTION_CHECKPOINT, seed_everything, train_two_tower
from pipeline.modeling.warm_start import warm_start_of
from pipeline.records import ModelMetadata
from pipeline.serving import read_index_record

log = logging.getLogger(__name__)


def train_teacher(ds: str, catalog: Catalog, cfg: PipelineConfig, reuse: bool = False) -> dict:
    """Train, early-stop on validation Recall@K, export and describe the teacher.

    Args:
        ds: Logical date of the features to train on.
        catalog: Where artifacts live.
        cfg: Pipeline settings (``training``, ``teacher``, ``serving``, ``evaluate``).
        reuse: Return the teacher already exported with this identity (same features and
            settings) instead of training again.

    Returns:
        ``{"version", "path", "metrics", "best_epoch", "epochs", "seconds", "trainable_params", "reused"}``.
    """
    features_dir = catalog.features(ds)
    final = catalog.teacher(ds, cfg)
    if reuse and ModelMetadata.exists(final):
        meta = ModelMetadata.load(final)
        if not meta.refitted or meta.selection_checkpoint:
            log.info("reusing teacher %s (validation %s)", final.name, meta.metrics)
            return {**_summary(meta, final), "reused": True}
        log.info("not reusing teacher %s: refitted, but exported without its selection run's weights", final.name)

    seed_everything(cfg.training.seed)
    users, items = load_user_table(features_dir), load_item_table(features_dir)
    warm = warm_start_of("teacher", ds, catalog, cfg, build_teacher)
    with atomic_dir(final) as tmp:  # trains inside it: the TensorBoard logs, written as epochs end, publish with the model
        trained = train_two_tower(lambda u, phase: warm.apply(build_teacher(u, items, cfg), u, items, phase), lambda m: m, features_dir,
                                  users, items.size, cfg, cfg.teacher.epochs, "teacher", log_dir=tmp / TENSORBOARD,
                                  warm=warm.started)
        model, fit = trained.model, trained.fit
        meta = ModelMetadata.from_dict({
            "version": final.name, "ds": ds, "role": "teacher", "features": str(features_dir),
            "features_manifest": read_manifest(features_dir).counts, "config": cfg.to_dict(),
            "config_hash": cfg.config_hash(), **trained.record(TENSORBOARD),
            "selection_checkpoint": SELECTION_CHECKPOINT if trained.refit else None, "warm_start": warm.record,
        })
        if trained.refit:
            trained.selection_model.save_weights(str(tmp / SELECTION_CHECKPOINT / "weights"))
        # The faiss index's probe depth is set on the validation users' queries.
        export_retrieval(model, with_history_before_test(features_dir, users, items.size), items, tmp / "saved_model", cfg.serving,
                         probe_user_ids=users.user_ids[users_of_split(features_dir, "validation")])
        model.save_weights(str(tmp / CHECKPOINT / "weights"))
        meta = dataclasses.replace(meta, extra={**meta.extra, "serving_index": read_index_record(tmp)})
        meta.save(tmp)
    log.info("teacher %s: %d params, best epoch %d, validation recall@%d=%.4f, %.0fs%s", final.name, trained.params,
             fit.best_epoch, cfg.training.early_stopping_k, fit.best_score, meta.seconds,
             " (refitted on train + validation)" if trained.refit else "")
    return {**_summary(meta, final), "reused": False}


def _summary(meta: ModelMetadata, path: Path) -> dict:
    return {"version": meta.version, "path": str(path), "metrics": meta.metrics, "best_epoch": meta.best_epoch,
            "epochs": len(meta.history), "seconds": meta.seconds, "trainable_params": meta.trainable_params,
            "warm_start": meta.warm_start}


def main(argv=None) -> int:
    return cli.run_step(train_teacher, "Train and export the teacher recommender.", argv)


if __name__ == "__main__":
    raise SystemExit(main())
