"""Checkpoints: DeepSpeed's directory shape, a per-parameter resharding format, atomic publication.

[Note: checkpoint format]
```
save_dir/
  latest                          text: the tag of the newest complete checkpoint (written last, atomically)
  <tag>/                          default tag: global_step{N}
    checkpoint.json               manifest (below)
    mp_rank_00_model_states.pt    rank 0: module state dict (working dtype, buffers included) + metadata
    zero_shard_rank{r}.pt         rank r: the element ranges it owns of every parameter's fp32 master
                                  weights and per-element optimizer states
  <tag>.tmp-<token>/              a save in progress (removed if it fails; a crashed one by the next save)
  <tag>.old-<token>/              the previous <tag> while a save replaces it (see atomic.py)
```
Shard file: `{"format_version", "rank", "world_size", "entries": {param name: [{"start", "end", "master":
1-D fp32 tensor, "optim": {state name: 1-D tensor}}]}}`. Ranges index the parameter flattened row-major,
so nothing depends on the ZeRO flat-buffer layout: any world size and stage reads any range of any tensor
by stitching pieces (`ShardReader.read`). Each element is written once, by the lowest rank holding it
([Note: shard ownership] in shard_io.py): ZeRO-0 writes only rank 0's file.

Model-states file (rank 0, torch.save): `module`, `buffer_names`, `param_shapes`, `frozen_param_names`,
`shared_params` (tied alias -> source name), `scalar_state` (the engine's `checkpoint_scalar_state()`:
`optimizer_groups` = per group hyperparameters and scalar optimizer state such as `step`, `loss_scaler`,
`counters`, `lr_scheduler`), copies of `lr_scheduler`, `global_steps`, `global_samples`, `skipped_steps`,
`micro_steps` at top level (DeepSpeed's keys), `mid_accumulation`, `rng_states` (per rank), `dp_world_size`,
`topology` (world size, ZeRO stage, sharding policy), `client_state`, `ds_version`, `dsrun_version`.

Manifest `checkpoint.json`: `format` ("dsrun-checkpoint"), `format_version`, `tag`, `dsrun_version`,
`topology`, `params` (name -> shape, dtype, numel, frozen), `param_order`, `excluded_frozen_parameters`,
`mid_accumulation`, `shards` (file -> name -> [[start, end], ...]), `files` (every file the folder must
hold; checked on load), `optim_keys`, `checksums` (`algorithm` and, per file, `bytes` and `digest`; each rank
verifies the files it reads: [Note: checkpoint checksums] in integrity.py; absent in checkpoints written
before it existed, which load unverified).

Atomicity: [Note: atomic checkpoint publish] in atomic.py. Loading: `engine_io.load` restores the module
state dict, then hands the engine a `read(name, key, start, end)` served from the shard files. The
converter `dsrun-to-fp32` (to_fp32.py) streams parameters the same way. Each save also puts
`zero_to_fp32.py` (standalone_to_fp32.py, torch only) into save_dir, as DeepSpeed does.

DeepSpeed's own checkpoints (a tag folder without `checkpoint.json`) are read by both through
deepspeed_format.py, which serves the same `read` from DeepSpeed's files ([Note: DeepSpeed checkpoint
layout]).
"""
from dsrun.runtime.checkpoint.errors import CheckpointArgumentError, CheckpointError
from dsrun.runtime.checkpoint.shard_io import ShardReader

__all__ = ["CheckpointError", "CheckpointArgumentError", "ShardReader"]
