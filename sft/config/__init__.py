"""The run config, the bottom layer: typed sections (sections.py), the run that holds them and its cross-section
checks (run.py), the field types that read more than their plain type (fields.py), reading YAML plus overrides
(loading.py, through pydantic), data source specs (specs.py) and the strategies' option table (strategy_options.py). Nothing here imports data, train or export."""

from sft.config.loading import load_config
from sft.config.run import ACCEPTABLE_CHANGES, SFTConfig
from sft.config.sections import (DataArgs, ModelArgs, StrategyArgs, TrainingArgs, ValidationConfig, WorkerConfig,
                                 parse_device_mapping)

__all__ = ["ACCEPTABLE_CHANGES", "DataArgs", "ModelArgs", "SFTConfig", "StrategyArgs", "TrainingArgs",
           "ValidationConfig", "WorkerConfig", "load_config", "parse_device_mapping"]
