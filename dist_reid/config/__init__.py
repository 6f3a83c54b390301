"""Typed, validated configuration: YAML with ``_base_`` inheritance plus dotted overrides."""

from dist_reid.config.compare import (
    RESUME_NEUTRAL_KEYS,
    config_changes,
    describe_changes,
    plain_config,
)
from dist_reid.config.load import build_config, config_hash, load_config, save_config, to_yaml
from dist_reid.config.schema import (
    DATASET_SETTINGS,
    DATASETS,
    PROGRESS_BAR_SETTINGS,
    TRACKERS,
    AugmentConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SyntheticConfig,
    TrainConfig,
)

__all__ = [
    "DATASETS",
    "DATASET_SETTINGS",
    "PROGRESS_BAR_SETTINGS",
    "RESUME_NEUTRAL_KEYS",
    "TRACKERS",
    "AugmentConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "SyntheticConfig",
    "TrainConfig",
    "build_config",
    "config_changes",
    "config_hash",
    "describe_changes",
    "load_config",
    "plain_config",
    "save_config",
    "to_yaml",
]
