"""One typed configuration for every stage; it owns every default.

Run-time knobs (Airflow ``Param``s, CLI ``--config`` JSON files and ``--set`` pairs, test
overrides) are turned once into a frozen :class:`PipelineConfig` by :func:`load_config`;
modules read fields from it and never keep numbers of their own.
"""

from pipeline.config.loading import PARAM_SETTINGS, load_config, overrides_from_params, param_defaults, parse_ds
from pipeline.config.sections import (
    ConfigError,
    DistillConfig,
    EvalConfig,
    FeatureConfig,
    GateConfig,
    PipelineConfig,
    ServingConfig,
    SoftTargetConfig,
    TowerConfig,
    TrainingConfig,
    stable_hash,
)

__all__ = [
    "PARAM_SETTINGS", "ConfigError", "DistillConfig", "EvalConfig", "FeatureConfig", "GateConfig", "PipelineConfig",
    "ServingConfig", "SoftTargetConfig", "TowerConfig", "TrainingConfig", "load_config", "overrides_from_params",
    "param_defaults", "parse_ds", "stable_hash",
]
