"""How a training phase runs, cold or warm-started (the warm policy of ``training``)."""

from __future__ import annotations

from pipeline.config import TrainingConfig


def phase_schedule(training: TrainingConfig, warm: bool) -> dict:
    """How a training phase runs: ``{"warm", "learning_rate", "patience"}``. A phase that starts
    from last night's weights trains at ``warm_learning_rate_scale`` x the learning rate; a warm
    selection run, starting near its best epoch, stops after ``warm_patience`` epochs without gain."""
    if not warm:
        return {"warm": False, "learning_rate": training.learning_rate, "patience": training.patience}
    return {"warm": True, "learning_rate": training.learning_rate * training.warm_learning_rate_scale,
            "patience": training.warm_patience}
