"""The operator's bound on Spark masters: which clusters a run's settings may send work to.

``features.spark_master`` and ``soft_targets.spark_master`` arrive with a trigger's
``config_overrides``, so whoever can trigger a run could otherwise point a driver (with the
run's data) at any URL. A run may use a local master (``local``, ``local[N]``,
``local[*]``) or one of the masters the operator lists in ``$RECSYS_ALLOWED_SPARK_MASTERS``
(comma-separated; ``make services`` lists its own cluster). Anything else fails when the
run's config is resolved. The feature job's master under the DAG is the ``recsys_spark``
connection's, which only an operator edits.
"""

from __future__ import annotations

import os
import re

from pipeline.config.checks import ConfigError
from pipeline.config.sections import PipelineConfig

SPARK_MASTERS_ENV = "RECSYS_ALLOWED_SPARK_MASTERS"
LOCAL_MASTER = re.compile(r"local(\[(\*|[1-9][0-9]*)(,[1-9][0-9]*)?\])?")
SETTINGS = (("features", "spark_master"), ("soft_targets", "spark_master"))


def allowed_spark_masters() -> tuple[str, ...]:
    """The cluster masters the operator allows (``$RECSYS_ALLOWED_SPARK_MASTERS``), besides local ones."""
    return tuple(m.strip() for m in os.environ.get(SPARK_MASTERS_ENV, "").split(",") if m.strip())


def check_spark_masters(cfg: PipelineConfig, allowed: tuple[str, ...] | None = None) -> None:
    """Reject a run whose Spark masters are neither local nor allowed by the operator.

    Raises:
        ConfigError: Naming the setting, its value and what is allowed.
    """
    allowed = allowed_spark_masters() if allowed is None else allowed
    for section, key in SETTINGS:
        value = getattr(getattr(cfg, section), key)
        if value is None or LOCAL_MASTER.fullmatch(value) or value in allowed:
            continue
        raise ConfigError(f"{section}.{key}={value!r} is not a Spark master the operator allows: local, local[N], local[*]"
                          f"{' or one of ' + str(list(allowed)) if allowed else ''} (${SPARK_MASTERS_ENV})")
