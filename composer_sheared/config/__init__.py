"""The recipe's config: schema, loading, and the one validation pass that runs before anything loads.

schema (the dataclasses, ConfigError, where a run's files go), load (YAML + overrides), checks
(validation); everything a caller needs is imported here.

`load_config(yaml, overrides)` merges the YAML and `key=value` overrides into the typed
`TrainConfig` (omegaconf structured config) and validates the whole of it: types, durations,
domains and proportions, reference losses, paths, the data directory, and the pruning target
resolved against the source's config (read from config.json, a .gguf header or a named shape;
no weights). Every problem becomes a `ConfigError` entry `(key, what was expected)`; the CLI prints
them as `error: <key>: <message>` and exits with code 2.
"""
from composer_sheared.config.checks import check_data, source_hf_config, validate
from composer_sheared.config.load import load_config
from composer_sheared.config.schema import (EMBEDDED, LAGRANGIAN_WARMUP, ConfigError, DataConfig, DistillationConfig,
                                            DownstreamConfig, DynamicLoadingConfig, LoggersConfig, ModelConfig,
                                            OptimizerConfig, PlanConfig, PruningConfig, Resolved, SchedulerConfig,
                                            TrainConfig, hf_output_dir, metrics_path, output_folder, plain,
                                            resume_folder)

__all__ = ["TrainConfig", "ConfigError", "Resolved", "load_config", "validate", "check_data", "source_hf_config",
           "hf_output_dir", "metrics_path", "output_folder", "plain", "resume_folder", "EMBEDDED",
           "LAGRANGIAN_WARMUP", "ModelConfig", "DataConfig", "OptimizerConfig", "SchedulerConfig", "PruningConfig",
           "DistillationConfig", "DynamicLoadingConfig", "DownstreamConfig", "LoggersConfig", "PlanConfig"]
