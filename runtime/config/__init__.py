"""The config layer: load, validate and resolve a DeepSpeed config once, into typed sections and policies.

    from dsrun.runtime.config import load_config, DsConfig, ConfigError
    cfg = load_config("ds_config.json", world_size=dp_size, auto={"lr": 3e-4})
    cfg.train_batch_size, cfg.sharding, cfg.precision, cfg.fingerprint()

Modules, one concept each: `loader` (source -> dict), `auto` ("auto" rules), `schema` (strict typed
sections), `toplevel`/`zero`/`precision`/`optim`/`sections` (the sections), `batch` (batch triple),
`resolve` (policies), `policies` (the policy objects), `ds_config` (DsConfig and load_config),
`compat` (DeepSpeed's `DeepSpeedConfig` class).
"""
from dsrun.errors import ConfigError

from .batch import BatchTriple, resolve_batch
from .compat import DeepSpeedConfig
from .ds_config import DsConfig, diff_keys, load_config
from .optim import OptimizerConfig, SchedulerConfig
from .policies import (CommPolicy, Device, LossScalePolicy, OffloadPolicy, PrecisionPolicy, ShardingPolicy,
                       torch_dtype)
from .precision import BF16Config, DataTypesConfig, FP16Config
from .sections import (ActivationCheckpointingConfig, CheckpointConfig, CometConfig, CSVMonitorConfig,
                       PipelineConfig, TensorBoardConfig, WandbConfig)
from .schema import ConfigDeprecationWarning, ConfigIgnoredKeyWarning
from .zero import OffloadOptimizerConfig, OffloadParamConfig, ZeroConfig

__all__ = ["load_config", "DsConfig", "ConfigError", "diff_keys", "DeepSpeedConfig", "BatchTriple", "resolve_batch",
           "OptimizerConfig", "SchedulerConfig", "FP16Config", "BF16Config", "DataTypesConfig", "ZeroConfig",
           "OffloadOptimizerConfig", "OffloadParamConfig", "CheckpointConfig", "ActivationCheckpointingConfig",
           "PipelineConfig", "TensorBoardConfig", "CSVMonitorConfig", "WandbConfig", "CometConfig",
           "ShardingPolicy", "OffloadPolicy", "PrecisionPolicy", "LossScalePolicy", "CommPolicy", "Device",
           "torch_dtype", "ConfigDeprecationWarning", "ConfigIgnoredKeyWarning"]
