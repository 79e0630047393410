"""`Engine.save_checkpoint` / `load_checkpoint` / `save_16bit_model`: the engine delegates here.

The engine is seen only through its checkpoint contract (runtime/shard_state.py): `checkpoint_shards()`,
`load_checkpoint_shards(read, load_optimizer_states=)`, `checkpoint_scalar_state()` /
`load_checkpoint_scalar_state(state, load_optimizer_states=, load_lr_scheduler_states=)` (optimizer
groups and scalar state, loss scaler, counters, scheduler), `module` and `global_steps`. The on-disk format is
described in [Note: checkpoint format] (`dsrun/runtime/checkpoint/__init__.py`). Save and load are
collective: every rank calls them.
"""
from __future__ import annotations

import logging
import os

import torch

from dsrun.runtime.checkpoint import deepspeed_format, integrity, layout
from dsrun.runtime.checkpoint.atomic import fsync_dir, torch_save_synced, write_file_atomic
from dsrun.runtime.checkpoint.comm import Comm
from dsrun.runtime.checkpoint.save_folder import SaveFolder
from dsrun.runtime.checkpoint.errors import CheckpointArgumentError, CheckpointError
from dsrun.runtime.checkpoint.shard_io import ShardReader, check_coverage, plan_ownership, shard_payload
from dsrun.runtime.log import warn_once_rank0

logger = logging.getLogger(__name__)

__all__ = ["save", "load", "save_16bit_model", "CONVERTER_SCRIPT"]

CONVERTER_SCRIPT = "zero_to_fp32.py"  # DeepSpeed's name for the script each checkpoint directory carries


# --- engine accessors: the one place that knows attribute names -------------------------------------

def _tag_validation_mode(engine) -> str:
    config = getattr(engine, "config", None) or getattr(engine, "_config", None)
    mode = getattr(getattr(config, "checkpoint", None), "tag_validation", None)
    return str(mode or "Warn").lower()


def _topology(engine, comm) -> dict:
    topo = {"world_size": comm.world_size}
    stage = getattr(engine, "zero_optimization_stage", None)
    if callable(stage):
        try:
            topo["zero_stage"] = int(stage())
        except Exception:  # a topology note must never break a save
            pass
    policy = getattr(engine, "sharding", None) or getattr(engine, "sharding_policy", None)
    if policy is not None and hasattr(policy, "optimizer_state"):
        topo["sharding"] = {k: bool(getattr(policy, k)) for k in ("optimizer_state", "gradients", "parameters")}
    return topo


def _describe(topo: dict) -> str:
    parts = [f"world_size={topo.get('world_size')}"]
    if "zero_stage" in topo:
        parts.append(f"zero_stage={topo['zero_stage']}")
    return ", ".join(parts)


def _rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _shared_aliases(module) -> dict:
    """State-dict names that are the same tensor as an earlier name (tied weights): alias -> canonical."""
    seen, aliases = {}, {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if isinstance(tensor, torch.nn.Parameter):  # by identity: a released ZeRO-3 parameter has no storage
            key = ("param", id(tensor))
        else:
            key = (tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
        elif key is not None:
            seen[key] = name
    return aliases


def _module_state(engine, exclude_frozen: set) -> dict:
    state = engine.module.state_dict()
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items() if k not in exclude_frozen}


# --- save ----------------------------------------------------------------------------------------------

def _agree_on_tag(comm, tag, mode):
    """The tag every rank uses: rank 0's. Differing tags raise under 'fail', warn under 'warn' (the default)
    and pass silently under 'ignore' (DeepSpeed would write a folder per tag, none of them complete)."""
    tags = comm.all_gather(tag)
    if len(set(tags)) > 1 and mode != "ignore":
        detail = ", ".join(f"rank {r}: {t!r}" for r, t in enumerate(tags))
        message = f"the checkpoint tag is not the same on all ranks ({detail})"
        if mode == "fail":
            raise CheckpointError(message, where="checkpoint.tag_validation",
                                  hint="pass the same tag on every rank (or leave it None for global_step<N>)")
        if comm.rank == 0:
            logger.warning("%s; saving under rank 0's tag %r", message, tags[0])
    return tags[0]


def save(engine, save_dir, tag=None, client_state=None, save_latest=True, exclude_frozen_parameters=False):
    """Write a checkpoint of `engine` to `save_dir/<tag>` (collective). Returns True.

    Args:
        save_dir: the checkpoint root; `<tag>/` and `latest` are created in it.
        tag: folder name; default `global_step{engine.global_steps}`.
        client_state: picklable dict returned by `load()`.
        save_latest: point `save_dir/latest` at this tag once the folder is complete.
        exclude_frozen_parameters: leave frozen parameters out of the checkpoint.
    """
    if save_dir is None or str(save_dir) == "":
        raise CheckpointArgumentError("save_dir must be a non-empty path", where="save_checkpoint(save_dir)")
    save_dir = os.fspath(save_dir)
    comm = Comm()
    tag = layout.validate_tag(layout.default_tag(engine.global_steps) if tag is None else tag)
    tag = _agree_on_tag(comm, tag, _tag_validation_mode(engine))

    shards = [s for s in engine.checkpoint_shards() if not (exclude_frozen_parameters and s.frozen)]
    held = {}
    for s in shards:
        held.setdefault(s.name, []).append((s.start, s.end))
    meta = {s.name: {"shape": list(s.shape), "dtype": str(s.dtype).replace("torch.", ""), "numel": s.numel,
                     "frozen": bool(s.frozen)} for s in shards}
    optim_keys = sorted({k for s in shards for k in (s.optim or {})})
    gathered = comm.all_gather({"held": held, "rng": _rng_state(), "optim_keys": optim_keys})
    plan = plan_ownership([g["held"] for g in gathered])
    check_coverage(plan, {name: info["numel"] for name, info in meta.items()})
    folder = SaveFolder.open(comm, save_dir, tag)

    mine = plan[comm.rank]
    record = error = None
    try:
        if mine:
            payload = {"format_version": layout.FORMAT_VERSION, "rank": comm.rank, "world_size": comm.world_size,
                       "entries": shard_payload(shards, mine)}
            record = torch_save_synced(payload, os.path.join(folder.tmp_dir, layout.shard_file(comm.rank)))
    except Exception as err:  # reported on every rank below
        error = err
    records = folder.written(error, "writing shard files", value=record)
    checksums = {layout.shard_file(r): rec for r, rec in enumerate(records) if rec is not None}

    def last_files():
        _write_rank0_files(engine, comm, folder.tmp_dir, tag, plan, meta, client_state, exclude_frozen_parameters,
                           gathered, checksums)
        _write_converter_script(folder.save_dir)
    folder.publish(save_latest, last_files)
    return True


def _write_rank0_files(engine, comm, tmp_dir, tag, plan, meta, client_state, exclude_frozen, gathered, checksums):
    frozen_names = {name for name, info in meta.items() if info["frozen"]}
    excluded = set()
    if exclude_frozen:
        excluded = {name for name, p in engine.module.named_parameters() if name not in meta}
        frozen_names |= excluded
    scalar = engine.checkpoint_scalar_state()
    counters = scalar["counters"]
    gas = getattr(engine, "gradient_accumulation_steps", None)
    gas = gas() if callable(gas) else 1
    mid_accumulation = bool(gas > 1 and counters.get("micro_steps", 0) % gas != 0)
    topo = _topology(engine, comm)
    states = {
        "module": _module_state(engine, excluded),
        "buffer_names": [name for name, _ in engine.module.named_buffers()],
        "param_shapes": {name: info["shape"] for name, info in meta.items()},
        "frozen_param_names": sorted(frozen_names),
        "shared_params": _shared_aliases(engine.module),
        "scalar_state": scalar,
        "lr_scheduler": scalar.get("lr_scheduler"),
        "global_steps": counters.get("global_steps", 0),
        "global_samples": counters.get("global_samples", 0),
        "skipped_steps": counters.get("skipped_steps", 0),
        "micro_steps": counters.get("micro_steps", 0),
        "mid_accumulation": mid_accumulation,
        "rng_states": [g["rng"] for g in gathered],
        "dp_world_size": comm.world_size,
        "topology": topo,
        "client_state": dict(client_state or {}),
        "ds_version": "0.19.6",  # the DeepSpeed behaviour this format mirrors
        "dsrun_version": _dsrun_version(),
    }
    checksums = dict(checksums)
    checksums[layout.MODEL_STATES] = torch_save_synced(states, os.path.join(tmp_dir, layout.MODEL_STATES))
    shard_files = {layout.shard_file(r): {name: [list(x) for x in ranges] for name, ranges in owned.items()}
                   for r, owned in enumerate(plan) if owned}
    optim_keys = sorted({k for g in gathered for k in g["optim_keys"]})
    manifest = {
        "format": layout.FORMAT_NAME,
        "format_version": layout.FORMAT_VERSION,
        "tag": tag,
        "dsrun_version": _dsrun_version(),
        "topology": topo,
        "params": meta,
        "param_order": list(meta),
        "excluded_frozen_parameters": bool(exclude_frozen),
        "mid_accumulation": mid_accumulation,
        "shards": shard_files,
        "files": [layout.MODEL_STATES] + sorted(shard_files),
        "optim_keys": optim_keys,
        "checksums": {"algorithm": integrity.ALGORITHM, "files": checksums},
    }
    layout.write_manifest(tmp_dir, manifest)
    fsync_dir(tmp_dir)


def _write_converter_script(save_dir):
    """Put `zero_to_fp32.py` (standalone_to_fp32.py: needs only torch) beside the tags, as DeepSpeed puts its
    own, so the weights can be recovered where dsrun is not installed."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standalone_to_fp32.py")
    target = os.path.join(save_dir, CONVERTER_SCRIPT)
    with open(source, "rb") as f:
        write_file_atomic(target, f.read())
    try:
        os.chmod(target, 0o755)
    except OSError:  # a share that refuses modes: the script still runs as `python zero_to_fp32.py`
        pass


def _dsrun_version():
    try:
        import dsrun
        return dsrun.__version__
    except Exception:
        return "unknown"


# --- load ----------------------------------------------------------------------------------------------

class _EngineRead:
    """The `read(name, key, start, end)` handed to `engine.load_checkpoint_shards`.

    Serves saved tensors from the shard files; when optimizer states are not to be loaded, or a parameter
    was excluded from the checkpoint (frozen), serves the engine's own current values instead, so the
    engine can restore everything through one code path and those values stay as they were.
    """

    def __init__(self, reader, live, module_state, load_optimizer_states, topo_note):
        self.reader = reader
        self.live = live
        self.module_state = module_state
        self.load_optimizer_states = load_optimizer_states
        self.topo_note = topo_note

    def saved_keys(self, name):
        """Keys to restore for `name`: 'master' plus the saved optimizer state names (only 'master' when
        optimizer states are not being loaded); empty when `name` was not saved."""
        if name not in self.reader.manifest["params"]:
            return []
        keys = self.reader.keys(name)
        return keys if self.load_optimizer_states else [k for k in keys if k == "master"] or ["master"]

    def _live(self, name, key, start, end):
        shard = self.live.get(name)
        if shard is None or start < shard.start or end > shard.end:
            raise CheckpointError(f"{name}: cannot serve [{start}, {end}) of {key!r}")
        value = shard.master if key == "master" else shard.optim.get(key)
        if value is None:
            raise KeyError(f"{name}: no current {key!r} to keep")
        return value.detach()[start - shard.start:end - shard.start].clone()

    def __call__(self, name, key, start, end):
        saved = name in self.reader.manifest["params"]
        if key != "master" and not self.load_optimizer_states:
            return self._live(name, key, start, end)
        if not saved:
            shard = self.live.get(name)
            if shard is not None and shard.frozen and self.reader.manifest.get("excluded_frozen_parameters"):
                return self._live(name, key, start, end)
            raise CheckpointError(f"parameter {name!r} is not in the checkpoint ({self.topo_note})",
                                  hint="the model must have the same parameter names as when it was saved")
        info = self.reader.manifest["params"][name]
        shard = self.live.get(name)
        if shard is not None and tuple(info["shape"]) != tuple(shard.shape):
            raise CheckpointError(f"parameter {name!r} has shape {tuple(shard.shape)} but was saved as "
                                  f"{tuple(info['shape'])} ({self.topo_note})")
        if key == "master" and not self.reader.has(name, "master", start, end):
            flat = self.module_state[name].reshape(-1)[start:end]
            return flat.to(torch.float32)
        if key != "master" and not self.reader.has(name, key, start, end):
            # Saved before the optimizer created this state (e.g. right after init): fresh state is zeros.
            like = shard.optim.get(key) if shard is not None else None
            dtype = like.dtype if like is not None else torch.float32
            return torch.zeros(end - start, dtype=dtype)
        return self.reader.read(name, key, start, end)


def _load_module(engine, states, manifest, strict, custom_load_fn, topo_note):
    module_state = states["module"]
    if custom_load_fn is not None:
        custom_load_fn(src=module_state, dst=engine.module)
        return
    # Parameters (tied aliases included) are restored from the shard files by load_checkpoint_shards; a
    # ZeRO-3 module state holds empty placeholders for them, so only buffers are loaded from it here.
    params = {k for k, v in engine.module.state_dict(keep_vars=True).items() if isinstance(v, torch.nn.Parameter)}
    module_state = {k: v for k, v in module_state.items() if k not in params}
    current = engine.module.state_dict()
    wrong = [f"{k}: saved {tuple(v.shape)}, model {tuple(current[k].shape)}" for k, v in module_state.items()
             if k in current and tuple(v.shape) != tuple(current[k].shape)]
    if wrong:
        raise CheckpointError(f"parameter shapes differ from the checkpoint ({topo_note}): " + "; ".join(wrong[:10]),
                              hint="load into the same model architecture it was saved from")
    result = engine.module.load_state_dict(module_state, strict=False)
    excluded = set(states.get("frozen_param_names", [])) if manifest.get("excluded_frozen_parameters") else set()
    missing = [k for k in result.missing_keys if k not in excluded and k not in params]
    if strict and (missing or result.unexpected_keys):
        raise CheckpointError(f"module state does not match the model: missing {missing[:10]}, unexpected "
                              f"{result.unexpected_keys[:10]}", hint="pass load_module_strict=False to load "
                              "the matching entries only")


def _open_checkpoint(engine, load_dir, tag):
    """Find the tag folder, read its manifest, verify and open the model states and the shard files this
    rank's parameter ranges need. Returns `(model-states path, manifest, states, reader)`, or None (with
    a warning) when no tag is given and there is no `latest` file. Errors are CheckpointErrors naming the
    file or tag. A DeepSpeed checkpoint folder is read whole into the same shapes (deepspeed_format.py)."""
    if tag is None:
        tag = layout.read_latest(load_dir)
        if tag is None:
            warn_once_rank0("no 'latest' file in %s and no tag given: nothing loaded", load_dir, logger=logger)
            return None
    else:
        tag = layout.validate_tag(tag, where="load_checkpoint(tag)")
    tag_dir = layout.resolve_tag_dir(load_dir, tag)
    if deepspeed_format.is_deepspeed_folder(tag_dir):
        trainable = [s.name for s in engine.checkpoint_shards() if not s.frozen]
        checkpoint = deepspeed_format.DeepSpeedCheckpoint(tag_dir, trainable_names=trainable)
        return checkpoint.states_path, checkpoint.manifest, checkpoint.dsrun_states(), checkpoint
    manifest = layout.read_manifest(tag_dir)
    states = integrity.load_torch_file(tag_dir, layout.MODEL_STATES, manifest, weights_only=False)
    if not isinstance(states, dict) or not {"module", "scalar_state"} <= set(states):
        raise CheckpointError("not a dsrun model-states file (no 'module' or 'scalar_state')",
                              where=os.path.join(tag_dir, layout.MODEL_STATES))
    reader = ShardReader(tag_dir, manifest)
    try:
        reader.open_files(reader.files_for({s.name: (s.start, s.end) for s in engine.checkpoint_shards()}))
    except BaseException:
        reader.close()
        raise
    return os.path.join(tag_dir, layout.MODEL_STATES), manifest, states, reader


def load(engine, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
         load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
    """Restore `engine` from `load_dir/<tag>` (collective), at any world size and ZeRO stage.

    Returns `(path of the model-states file, client_state)`, or `(None, None)` with a warning when `tag`
    is None and there is no `latest` file.
    """
    if load_dir is None or str(load_dir) == "":
        raise CheckpointArgumentError("load_dir must be a non-empty path", where="load_checkpoint(load_dir)")
    load_dir = os.fspath(load_dir)
    comm = Comm()
    opened, error = None, None
    try:
        opened = _open_checkpoint(engine, load_dir, tag)
    except Exception as err:  # every rank learns of it below, so none waits in a later collective
        error = err
    comm.raise_if_any(error, f"loading the checkpoint in {load_dir}")
    if opened is None:
        return None, None
    states_path, manifest, states, reader = opened
    tag_dir = os.path.dirname(states_path)
    saved_topo = manifest.get("topology", {})
    topo_note = f"saved with {_describe(saved_topo)}; now {_describe(_topology(engine, comm))}"
    if manifest.get("mid_accumulation") and comm.rank == 0:
        logger.warning("checkpoint %s was saved in the middle of a gradient accumulation window; the partial "
                       "gradients were not saved and accumulation restarts at the next micro-batch", tag_dir)

    restore_optimizer = load_optimizer_states and not load_module_only
    try:
        _load_module(engine, states, manifest, load_module_strict, custom_load_fn, topo_note)
        live = {s.name: s for s in engine.checkpoint_shards()}  # after the module load: frozen values are current
        read = _EngineRead(reader, live, states["module"], restore_optimizer, topo_note)
        engine.load_checkpoint_shards(read, load_optimizer_states=restore_optimizer)
    finally:
        reader.close()

    if not load_module_only:
        scalar = dict(states["scalar_state"])
        counters = dict(scalar["counters"])
        # A save inside an accumulation window did not keep the partial gradients: restart the window.
        gas = getattr(engine, "gradient_accumulation_steps", None)
        gas = gas() if callable(gas) else 1
        counters["micro_steps"] = counters.get("micro_steps", 0) - counters.get("micro_steps", 0) % max(1, gas)
        scalar["counters"] = counters
        try:
            engine.load_checkpoint_scalar_state(scalar, load_optimizer_states=restore_optimizer,
                                                load_lr_scheduler_states=load_lr_scheduler_states)
        except ValueError as err:
            raise CheckpointError(f"{err} ({topo_note})", where=tag_dir,
                                  hint="load with load_optimizer_states=False to restore the weights only") from err
        rng = states.get("rng_states") or []
        if len(rng) == comm.world_size:
            torch.set_rng_state(rng[comm.rank]["torch"])
            if "cuda" in rng[comm.rank] and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng[comm.rank]["cuda"])
    comm.barrier()
    return states_path, states.get("client_state", {})


# --- 16-bit model --------------------------------------------------------------------------------------

def save_16bit_model(engine, save_dir, save_filename="pytorch_model.bin", exclude_frozen_parameters=False):
    """Rank 0 writes the module's state dict in its working dtype to `save_dir/save_filename` (atomic
    replace). Collective when the engine must gather parameters. Returns True."""
    if save_dir is None or str(save_dir) == "":
        raise CheckpointArgumentError("save_dir must be a non-empty path", where="save_16bit_model(save_dir)")
    comm = Comm()
    gather = getattr(engine, "consolidated_16bit_state_dict", None)
    state = gather() if callable(gather) else None
    error = None
    if comm.rank == 0:
        try:
            if state is None:
                state = engine.module.state_dict()
            if exclude_frozen_parameters:
                frozen = {n for n, p in engine.module.named_parameters() if not p.requires_grad}
                state = {k: v for k, v in state.items() if k not in frozen}
            state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
            os.makedirs(save_dir, exist_ok=True)
            path = os.path.join(save_dir, save_filename)
            tmp = f"{path}.tmp-{os.getpid()}"
            torch_save_synced(state, tmp)
            os.replace(tmp, path)
            fsync_dir(save_dir)
        except Exception as err:
            error = err
    comm.raise_if_any(error, "save_16bit_model")
    return True
