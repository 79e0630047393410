"""`dsrun.initialize` and `dsrun.add_config_arguments`: the DeepSpeed entry points of a training script."""
from __future__ import annotations

import argparse
from typing import Any, Optional, Tuple

from dsrun.errors import ConfigError, DsrunError

__all__ = ["initialize", "add_config_arguments", "install_excepthook"]

from .rank_errors import install_excepthook  # noqa: E402  (re-exported: the hook lives with the error files)


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add DeepSpeed's flags (group "DeepSpeed"): --deepspeed [PATH], --deepspeed_config and the deprecated
    --deepscale, --deepscale_config. Returns the parser.

    Bare `--deepspeed` is DeepSpeed's flag (args.deepspeed is True); `--deepspeed cfg.json` also names the
    config (args.deepspeed is the path; initialize() reads it when --deepspeed_config is not given).
    """
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument("--deepspeed", default=False, nargs="?", const=True, metavar="PATH",
                       help="Enable DeepSpeed; a PATH after it is the DeepSpeed json config "
                            "(same as --deepspeed_config PATH)")
    group.add_argument("--deepspeed_config", default=None, type=str, help="DeepSpeed json configuration file.")
    group.add_argument("--deepscale", default=False, action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--deepscale_config", default=None, type=str, help=argparse.SUPPRESS)
    return parser


def _config_source(args, config, config_params):
    if config is None:
        config = config_params
    from_args = None
    if args is not None:
        from_args = getattr(args, "deepspeed_config", None)
        if from_args is None and isinstance(getattr(args, "deepspeed", None), str):
            from_args = args.deepspeed  # `--deepspeed cfg.json` (add_config_arguments' nargs="?")
        deprecated = getattr(args, "deepscale_config", None)
        if from_args is None and deprecated is not None:
            from_args = deprecated
        elif from_args is not None and deprecated is not None:
            raise ConfigError("both --deepspeed_config and the deprecated --deepscale_config are given",
                              where="--deepscale_config", hint="pass only --deepspeed_config")
    if from_args is not None and config is not None:
        raise ConfigError("a config was given twice: in args.deepspeed_config and as initialize(config=...)",
                          where="initialize(config=...)", hint="pass the config one way only")
    source = config if config is not None else from_args
    if source is None:
        raise ConfigError("no DeepSpeed config given", where="initialize(config=...)",
                          hint="pass config=<dict or path>, or --deepspeed_config <path> with add_config_arguments")
    return source


def _check_same_config(cfg, group=None) -> None:
    import torch.distributed as dist
    if dist.get_world_size() == 1:
        return
    prints = [None] * dist.get_world_size()
    dist.all_gather_object(prints, cfg.fingerprint())
    if len(set(prints)) > 1:
        odd = [r for r, p in enumerate(prints) if p != prints[0]]
        raise ConfigError(f"the resolved config differs between ranks: ranks {odd} differ from rank 0",
                          where=getattr(cfg, "source", "config"),
                          hint="give every rank the same config file and the same 'auto' inputs")


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, distributed_port: int = 29500, mpu=None, dist_init_required: Optional[bool] = None,
               collate_fn=None, config: Any = None, mesh_param=None, config_params: Any = None) -> Tuple:
    """Build the training engine (DeepSpeed's signature).

    Returns `(engine, optimizer, training_dataloader, lr_scheduler)`. The config comes from `config`
    (dict or JSON/YAML path; `config_params` is DeepSpeed's older name) or `args.deepspeed_config`,
    never both. `optimizer` is an optimizer or a callable(params); `lr_scheduler` a scheduler or a
    callable(optimizer). User errors raise `ConfigError` (exit code 2).
    """
    install_excepthook()
    if model is None:
        raise ConfigError("dsrun.initialize requires a model", where="initialize(model=...)")
    source = _config_source(args, config, config_params)
    from .dist import init_distributed
    init_distributed(distributed_port=distributed_port, dist_init_required=dist_init_required)
    import torch.distributed as dist
    if not dist.is_initialized():
        raise ConfigError("torch.distributed is not initialised and dist_init_required=False",
                          where="initialize(dist_init_required=...)", hint="initialise it first or drop the flag")
    from .pipe.module import PipelineModule
    pipeline = isinstance(model, PipelineModule)
    if pipeline and mpu is not None:
        raise ConfigError("a PipelineModule brings its own process grid; do not pass mpu as well",
                          where="initialize(mpu=...)", hint="drop mpu=")
    grid = model.mpu() if pipeline else mpu
    dp_group = grid.get_data_parallel_group() if grid is not None else None
    dp_world = dist.get_world_size(dp_group)
    from .config import load_config
    cfg = load_config(source, world_size=dp_world)
    _check_same_config(cfg)
    if pipeline:  # DeepSpeed's PipelineEngine (runtime/pipe/engine.py)
        from .pipe.engine import PipelineEngine
        engine = PipelineEngine(model=model, config=cfg, optimizer=optimizer, model_parameters=model_parameters,
                                lr_scheduler=lr_scheduler, training_data=training_data, collate_fn=collate_fn)
        return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
    from .engine import Engine
    engine = Engine(model=model, config=cfg, optimizer=optimizer, model_parameters=model_parameters,
                    lr_scheduler=lr_scheduler, training_data=training_data, collate_fn=collate_fn, dp_group=dp_group)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
