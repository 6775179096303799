"""The student ladder as the benchmarks see it: its rungs by name, and the rung the gate would promote.

The gate's choice is the pipeline's own (:func:`pipeline.steps.run.decide`) for a first run,
with no champion: every rung gated against the teacher by :func:`pipeline.gate.evaluate_gate`
with ``cfg.gate``, then :func:`pipeline.gate.choose_rung` takes the cheapest rung to serve
that passes (most users/s, then fewest parameters), or the largest rung when none passes.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from pipeline.config import PipelineConfig
from pipeline.gate import RungResult, choose_rung, evaluate_gate


def rungs(cfg: PipelineConfig) -> dict[str, float | None]:
    """The ladder's rungs, cheapest budget first: model name (``student_kd@5%``, ...) -> parameter share."""
    return {cfg.rung_name(share): share for share in cfg.ladder_rungs()}


def plain_at_largest_rung(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` whose plain student (``student.max_param_share``) has the largest rung's budget.

    :func:`pipeline.steps.chain.run_chain` trains the plain student at ``student.max_param_share``
    when the ladder holds it: this makes sure it does, so the plain student is the largest
    rung trained without distillation. The rungs', teacher's and soft targets' identities do
    not depend on ``student.max_param_share``, so neither does what the catalogue finds.
    """
    shares = [share for share in cfg.ladder_rungs() if share is not None]
    if not shares or max(shares) == cfg.student.max_param_share:
        return cfg
    largest = max(shares)
    return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, max_param_share=largest))


def gate_ladder(cfg: PipelineConfig, models: Mapping[str, Mapping], users_per_s: Mapping[str, float] | None = None) -> dict:
    """Gate every rung against the teacher and choose the rung to promote, as the pipeline's gate task does.

    Args:
        cfg: Settings (``gate``, the ladder).
        models: Model name -> test metrics, as :func:`pipeline.steps.evaluate.evaluate_run`
            returns them (``teacher`` and every rung; ``trainable_params`` and, unless
            ``users_per_s`` is given, ``throughput_users_per_s``).
        users_per_s: The serving speed to rank the passing rungs by, by rung name; None: the
            evaluation's own ``throughput_users_per_s`` (what the pipeline ranks by).

    Returns:
        ``{"chosen": rung name, "decision": BLESSED | NOT_BLESSED, "why": one sentence,
        "ladder": [{"name", "share", "decision", "reasons", "users_per_s", "trainable_params"}, ...]}``.
    """
    teacher = models.get("teacher", {})
    results = []
    for name, share in rungs(cfg).items():
        metrics = models.get(name, {})
        gate = evaluate_gate(metrics, teacher, None, cfg.gate, champion_expected=False)
        speed = metrics.get("throughput_users_per_s") if users_per_s is None else users_per_s.get(name)
        results.append(RungResult(name, share, gate, speed, metrics.get("trainable_params")))
    chosen, why = choose_rung(results)
    return {"chosen": chosen.name, "decision": chosen.gate.decision, "why": why,
            "ladder": [{"name": r.name, "share": r.share, "decision": r.gate.decision, "reasons": r.gate.reasons,
                        "users_per_s": r.users_per_s, "trainable_params": r.trainable_params} for r in results]}
