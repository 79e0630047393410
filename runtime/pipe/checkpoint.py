"""Pipeline checkpoints: per-layer files (DeepSpeed's names) that reload at another number of stages.

    <save_dir>/<tag>/
        layer_00-model_states.pt ...                 one per layer: that layer module's state_dict (a tied
                                                     layer's file holds the tied module), written by the
                                                     data-parallel rank 0 of the stage holding it
        mp_rank_{SS}_model_states.pt                 per stage: counters, scheduler, client_state, config
                                                     (DeepSpeed's file; `module` is None as in DeepSpeed)
        zero_pp_rank_{D}_mp_rank_{SS}_optim_states.pt  per rank: fp32 master and optimizer state of the
                                                     parameters it owns, by parameter name
    <save_dir>/latest

Parameter names do not depend on the partition (module.py: layer i's parameters are `i.<name>`, tied
ones `tied_modules.<key>.<name>`), so a load builds each local layer from its own file and takes the
optimizer state of the parameters it owns from whichever rank's file holds them: any number of stages
or data-parallel ranks reloads any other (each rank reads the optimizer files of the whole job, which
are together the size of one copy of the optimizer state).

The save is atomic ([Note: atomic checkpoint publish] in runtime/checkpoint/atomic.py): every rank writes
into `<tag>.tmp-<token>`, rank 0 renames the folder to `<tag>` and then replaces `latest`.
"""
from __future__ import annotations

import glob
import logging
import os

import torch

from ..checkpoint import layout
from ..checkpoint.atomic import torch_save_synced
from ..checkpoint.comm import Comm
from ..checkpoint.save_folder import SaveFolder
from ..checkpoint.errors import CheckpointError

__all__ = ["save", "load", "layer_file", "stage_file", "optim_file"]

log = logging.getLogger(__name__)


def layer_file(idx: int) -> str:
    return f"layer_{idx:02d}-model_states.pt"


def stage_file(stage: int) -> str:
    return f"mp_rank_{stage:02d}_model_states.pt"


def optim_file(dp_rank: int, stage: int) -> str:
    return f"zero_pp_rank_{dp_rank}_mp_rank_{stage:02d}_optim_states.pt"


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in state.items()}


def _write_rank_files(engine, tmp_dir: str, tag: str, client_state: dict) -> None:
    module, stage = engine.module, engine.stage_id
    dp_rank = engine.grid.get_data_parallel_rank()
    if dp_rank == 0:
        for idx, layer in module.local_layers():
            if layer is not None:
                torch_save_synced(_cpu(layer.state_dict()), os.path.join(tmp_dir, layer_file(idx)))
        meta = {"module": None, "global_steps": engine.global_steps, "global_samples": engine.global_samples,
                "micro_steps": engine.micro_steps, "dp_world_size": engine.dp_world_size,
                "num_stages": engine.num_stages, "parts": list(module.parts), "tag": tag,
                "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
                "loss_scaler": engine.loss_scaler.state_dict(), "skipped_steps": engine.skipped_steps,
                "ds_config": engine.config.raw, "client_state": client_state}
        torch_save_synced(meta, os.path.join(tmp_dir, stage_file(stage)))
    optim = {"params": engine.stage_optimizer.state_by_name(), "param_groups": engine.stage_optimizer.hyperparameters(),
             "dp_world_size": engine.dp_world_size, "num_stages": engine.num_stages}
    torch_save_synced(optim, os.path.join(tmp_dir, optim_file(dp_rank, stage)))


def save(engine, save_dir, tag=None, client_state=None, save_latest: bool = True) -> bool:
    """Write `save_dir/<tag>` (default `global_step<N>`) and point `latest` at it. Collective."""
    if save_dir is None or str(save_dir) == "":
        raise CheckpointError("save_dir must be a non-empty path", where="save_checkpoint(save_dir)")
    save_dir = os.fspath(save_dir)
    comm = Comm()
    tag = layout.validate_tag(layout.default_tag(engine.global_steps) if tag is None else tag)
    tag = comm.all_gather(tag)[0]  # rank 0's tag for everyone
    folder = SaveFolder.open(comm, save_dir, tag)
    error = None
    try:
        _write_rank_files(engine, folder.tmp_dir, tag, client_state or {})
    except Exception as err:  # reported on every rank below
        error = err
    folder.written(error, "writing pipeline checkpoint files")
    folder.publish(save_latest)
    return True


def _read(path: str, weights_only: bool):
    if not os.path.isfile(path):
        raise CheckpointError("missing pipeline checkpoint file", where=path,
                              hint="the folder is incomplete or was not written by a pipeline engine")
    return torch.load(path, map_location="cpu", weights_only=weights_only)


def _read_optimizer_files(tag_dir: str):
    params, groups = {}, None
    for path in sorted(glob.glob(os.path.join(tag_dir, "zero_pp_rank_*_mp_rank_*_optim_states.pt"))):
        saved = _read(path, weights_only=False)
        params.update(saved["params"])
        groups = groups if groups is not None else saved["param_groups"]
    return params, groups


def load(engine, load_dir, tag=None, strict: bool = True, load_optimizer_states: bool = True,
         load_lr_scheduler_states: bool = True):
    """Load `load_dir/<tag>` (default: the tag in `latest`) into `engine`, whatever the number of stages
    and data-parallel ranks it was saved with. Returns (folder, client_state), or (None, None) when
    `load_dir` has no `latest` and no tag is given (DeepSpeed warns and returns the same)."""
    load_dir = os.fspath(load_dir)
    if tag is None:
        tag = layout.read_latest(load_dir)
        if tag is None:
            log.warning("no 'latest' file in %s: nothing loaded (pass tag= to load a named checkpoint)", load_dir)
            return None, None
    tag_dir = layout.resolve_tag_dir(load_dir, layout.validate_tag(tag))
    with torch.no_grad():
        for idx, layer in engine.module.local_layers():
            if layer is not None:
                layer.load_state_dict(_read(os.path.join(tag_dir, layer_file(idx)), weights_only=True), strict=strict)
    meta = _read(os.path.join(tag_dir, stage_file(0)), weights_only=False)
    engine.global_steps, engine.global_samples = meta["global_steps"], meta["global_samples"]
    engine.micro_steps = meta.get("micro_steps", 0)
    if load_lr_scheduler_states and engine.lr_scheduler is not None and meta.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    engine.skipped_steps = meta.get("skipped_steps", 0)
    if load_optimizer_states and meta.get("loss_scaler"):  # fp16's scale travels with the optimizer state
        engine.loss_scaler.load_state_dict(meta["loss_scaler"])
    params, groups = _read_optimizer_files(tag_dir) if load_optimizer_states else ({}, None)
    engine.stage_optimizer.load_state_by_name(params, groups, load_optimizer_states=load_optimizer_states)
    Comm().barrier()  # every rank has read the folder before any rank may save over it
    return tag_dir, meta.get("client_state", {})
