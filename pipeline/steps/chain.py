"""The distillation chain: teacher -> soft targets -> student (and the plain baseline).

Each stage is its own step module, so the DAG runs them as separate tasks; every other
caller (the benchmark, the tests, ``python -m pipeline.steps.chain``) runs them through
:func:`run_chain`. Each stage finds its input through the catalogue from the same
settings, so the stages need not pass paths to each other.
"""

from __future__ import annotations

import logging
import time

from pipeline import cli
from pipeline.catalog import Catalog
from pipeline.config import PipelineConfig
from pipeline.steps.distill import distill_student
from pipeline.steps.soft_targets import generate_soft_targets
from pipeline.steps.train_teacher import train_teacher

log = logging.getLogger(__name__)


def run_chain(ds: str, catalog: Catalog, cfg: PipelineConfig, reuse_teacher: bool = False,
              plain_baseline: bool = False) -> dict:
    """Train the teacher, write its soft targets, distil every rung of the student ladder.

    Args:
        ds: Logical date of the features.
        catalog: Where artifacts live.
        cfg: Settings.
        reuse_teacher: Reuse a teacher already exported with the same identity.
        plain_baseline: Also train the same student without distillation.

    Returns:
        ``{"teacher", "soft_targets", "students", "student", ["student_plain"], "seconds"}``: each
        stage's result; ``students`` by rung name, ``student`` the one at ``student.max_param_share``
        (the largest rung when the ladder does not hold it), whose size the plain baseline has.
    """
    started = time.perf_counter()
    result = {"teacher": train_teacher(ds, catalog, cfg, reuse=reuse_teacher)}
    result["soft_targets"] = generate_soft_targets(ds, catalog, cfg)
    result["students"] = {cfg.rung_name(share): {**distill_student(ds, catalog, cfg.rung(share)), "rung": share}
                          for share in cfg.ladder_rungs()}
    main_share = cfg.student.max_param_share if cfg.student.max_param_share in cfg.ladder_rungs() else cfg.ladder_rungs()[-1]
    result["student"] = result["students"][cfg.rung_name(main_share)]
    cfg = cfg.rung(main_share)
    if plain_baseline:
        result["student_plain"] = distill_student(ds, catalog, cfg.plain_student(), role="student_plain")
    result["seconds"] = round(time.perf_counter() - started, 1)
    log.info("chain for ds=%s done in %.0fs", ds, result["seconds"])
    return result


def _chain_step(ds: str, catalog: Catalog, cfg: PipelineConfig) -> dict:
    return run_chain(ds, catalog, cfg, plain_baseline=True)


def main(argv=None) -> int:
    return cli.run_step(_chain_step, "Train the teacher, write soft targets, distil the student and its plain baseline.", argv)


if __name__ == "__main__":
    raise SystemExit(main())
