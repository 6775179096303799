"""One typed configuration for every stage; it owns every default.

Run-time knobs (Airflow ``Param``s, CLI ``--config`` JSON files and ``--set`` pairs, test
overrides) are turned once into a frozen :class:`PipelineConfig` by :func:`load_config`,
which checks every setting (type, finiteness, range; unknown names rejected); modules read
fields from it and never keep numbers of their own. :func:`overrides_from_params` says which
of a trigger's two sources gives each setting. How far a run may loosen
the gate is not part of it: :class:`GateBounds` come from the operator (environment or an
Airflow Variable), never from a trigger.
"""

from pipeline.config.evaluation import COVERAGE_K, HITRATE_K, QUALITY_METRIC_FAMILIES, computed_quality_metrics, is_quality_metric
from pipeline.config.gate_bounds import GATE_BOUNDS_ENV, GATE_BOUNDS_VARIABLE, GateBounds, check_gate_bounds, load_gate_bounds
from pipeline.config.spark_masters import SPARK_MASTERS_ENV, allowed_spark_masters, check_spark_masters
from pipeline.config.loading import PARAM_SETTINGS, load_config, overrides_from_params, param_defaults, parse_ds, setting_sources
from pipeline.config.serving import ServingConfig
from pipeline.config.sections import (
    ConfigError,
    DistillConfig,
    EvalConfig,
    FeatureConfig,
    GateConfig,
    PipelineConfig,
    SoftTargetConfig,
    TowerConfig,
    TrainingConfig,
    stable_hash,
)

__all__ = [
    "SPARK_MASTERS_ENV", "allowed_spark_masters", "check_spark_masters",
    "COVERAGE_K", "GATE_BOUNDS_ENV", "GATE_BOUNDS_VARIABLE", "HITRATE_K", "PARAM_SETTINGS", "QUALITY_METRIC_FAMILIES",
    "ConfigError", "DistillConfig", "EvalConfig", "FeatureConfig", "GateBounds", "GateConfig", "PipelineConfig",
    "ServingConfig", "SoftTargetConfig", "TowerConfig", "TrainingConfig", "check_gate_bounds", "computed_quality_metrics",
    "is_quality_metric", "load_config", "load_gate_bounds", "overrides_from_params", "param_defaults", "parse_ds",
    "setting_sources", "stable_hash",
]
