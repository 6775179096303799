"""The scale benchmark runs the nightly DAG's tasks by hand: one distillation per rung of the
ladder, each with the settings the DAG's mapped task trains it with, so evaluation finds them."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import scale


@pytest.mark.parametrize("training", sorted(scale.TRAINING))
def test_each_rung_is_distilled_with_the_settings_the_dag_gives_it(training):
    settings = scale.run_settings(training)
    cfg = scale.run_config(settings)
    assert len(cfg.ladder_rungs()) > 1  # the default ladder: the case the benchmark once missed
    for share in cfg.ladder_rungs():
        assert scale.run_config(scale.rung_settings(settings, share)) == cfg.rung(share)


def test_a_night_runs_the_dags_heavy_tasks_in_order():
    settings = scale.run_settings("default")
    tasks = scale.night_tasks("2024-01-30", Path("/raw"), Path("/data"), settings)
    rungs = [f"distill_student@{share:.0%}" for share in scale.run_config(settings).ladder_rungs()]
    assert [name for name, _ in tasks] == ["extract_features", "train_teacher", "soft_targets", *rungs, "evaluate"]
    assert all("--ds" in command and command[command.index("--ds") + 1] == "2024-01-30" for _, command in tasks)
    assert not any("epochs" in arg for _, command in tasks for arg in command)  # the product's default training
