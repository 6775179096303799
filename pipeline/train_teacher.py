"""Train the teacher and export it: ``python -m pipeline.train_teacher --ds ... [--config ...]``.

Writes ``<data>/models/teacher/<version>/`` atomically: ``saved_model/`` (top-K for a
batch of user ids), ``checkpoint/`` (weights, for soft targets) and ``metadata.json``.
The version is derived from the feature manifest and the teacher's settings, so
re-running the same ``ds`` and config rewrites the same version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import pipeline  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from pipeline import cli
from pipeline.config import DataPaths, PipelineConfig
from pipeline.features import feature_partition, load_item_table, load_user_table, read_manifest
from pipeline.io import atomic_dir, write_json
from pipeline.models import build_teacher, export_retrieval
from pipeline.training import seed_everything, train_two_tower

log = logging.getLogger(__name__)

HISTORY_LENGTH_KEY = "history_length"


def teacher_version(ds: str, features_dir: Path, cfg: PipelineConfig) -> str:
    """``<ds>-<hash>`` of the feature manifest and every setting the teacher depends on."""
    settings = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in ("student", "student_epochs", "temperature", "alpha", "beta", "soft_loss", "ranking_decay", "sampled_negatives", "top_k")}
    blob = json.dumps({"manifest": read_manifest(features_dir), "train": settings}, sort_keys=True, default=str).encode()
    return f"{ds}-{hashlib.sha256(blob).hexdigest()[:10]}"


def train_teacher(ds: str, paths: DataPaths, cfg: PipelineConfig, reuse_latest: bool = False) -> dict:
    """Train, early-stop on validation Recall@K, export and describe the teacher.

    Args:
        ds: Logical date of the features to train on.
        paths: Data layout.
        cfg: Pipeline settings (``cfg.train``, ``cfg.evaluate``).
        reuse_latest: Reuse an existing teacher trained on these same features and settings
            instead of training again.

    Returns:
        ``{"version", "path", "metrics", "best_epoch", "epochs", "seconds", "reused"}``.
    """
    features_dir = feature_partition(paths.features, ds)
    version = teacher_version(ds, features_dir, cfg)
    final = paths.models / "teacher" / version
    if reuse_latest and (final / "metadata.json").is_file():
        meta = json.loads((final / "metadata.json").read_text())
        log.info("reusing teacher %s (validation %s)", version, meta["metrics"])
        return {**_summary(meta, final), "reused": True}

    seed_everything(cfg.train.seed)
    users = load_user_table(features_dir, read_manifest(features_dir)["config"][HISTORY_LENGTH_KEY])
    items = load_item_table(features_dir)
    model = build_teacher(users, items, cfg.train)
    fit, validation, params = train_two_tower(model, lambda m: m, features_dir, users.size, items.size, cfg,
                                              cfg.train.teacher_epochs, "teacher")
    meta = {
        "version": version, "ds": ds, "role": "teacher", "features": str(features_dir),
        "features_manifest": read_manifest(features_dir)["counts"], "config": cfg.to_dict(),
        "config_hash": cfg.config_hash(), "trainable_params": params,
        "metrics": {"validation": validation}, "best_epoch": fit.best_epoch, "history": fit.history,
        "seconds": fit.seconds, "tensorflow": tf.__version__,
    }
    with atomic_dir(final) as tmp:
        export_retrieval(model, users, items, tmp / "saved_model", k=cfg.train.top_k)
        model.save_weights(str(tmp / "checkpoint" / "weights"))
        write_json(tmp / "metadata.json", meta)
    log.info("teacher %s: %d params, best epoch %d, validation recall@%d=%.4f, %.0fs", version, params, fit.best_epoch,
             cfg.train.early_stopping_k, fit.best_score, fit.seconds)
    return {**_summary(meta, final), "reused": False}


def load_teacher(teacher_dir: str | Path, cfg: PipelineConfig | None = None):
    """Rebuild the teacher of ``teacher_dir`` and load its weights.

    Returns:
        ``(model, users, items, metadata)``.
    """
    from pipeline.config import load_config

    teacher_dir = Path(teacher_dir)
    meta = json.loads((teacher_dir / "metadata.json").read_text())
    cfg = cfg or load_config(meta["config"])
    features_dir = Path(meta["features"])
    users = load_user_table(features_dir, read_manifest(features_dir)["config"][HISTORY_LENGTH_KEY])
    items = load_item_table(features_dir)
    model = build_teacher(users, items, cfg.train)
    model.load_weights(str(teacher_dir / "checkpoint" / "weights")).expect_partial()
    return model, users, items, meta


def _summary(meta: dict, path: Path) -> dict:
    return {"version": meta["version"], "path": str(path), "metrics": meta["metrics"], "best_epoch": meta["best_epoch"],
            "epochs": len(meta["history"]), "seconds": meta["seconds"], "trainable_params": meta["trainable_params"]}


def main(argv=None) -> int:
    return cli.run_step(train_teacher, "Train and export the teacher recommender.", argv)


if __name__ == "__main__":
    raise SystemExit(main())
