"""`dsrun-to-fp32`: turn any dsrun or DeepSpeed checkpoint into a plain PyTorch fp32 state dict, without GPUs.

Streams one parameter at a time: shard files are opened with `torch.load(mmap=True)` and each parameter is
stitched from the pieces that hold it, so peak host memory is the output plus about one tensor. Names follow
DeepSpeed's `deepspeed.utils.zero_to_fp32`: `get_fp32_state_dict_from_zero_checkpoint`,
`convert_zero_checkpoint_to_fp32_state_dict`, `load_state_dict_from_zero_checkpoint`. A DeepSpeed checkpoint
folder (no dsrun manifest; deepspeed_format.py) is read whole instead, at any ZeRO stage, without DeepSpeed.
"""
from __future__ import annotations

import os
import sys
from collections import OrderedDict

import click
import torch

from dsrun.runtime.checkpoint import deepspeed_format, integrity, layout
from dsrun.runtime.checkpoint.atomic import torch_save_synced
from dsrun.runtime.checkpoint.errors import CheckpointError
from dsrun.runtime.checkpoint.shard_io import ShardReader

__all__ = ["get_fp32_state_dict_from_zero_checkpoint", "convert_zero_checkpoint_to_fp32_state_dict",
           "load_state_dict_from_zero_checkpoint", "iter_fp32_tensors", "main"]


def _tag_dir(checkpoint_dir, tag):
    checkpoint_dir = os.fspath(checkpoint_dir)
    if tag is None:
        if os.path.isfile(os.path.join(checkpoint_dir, layout.MANIFEST)) or \
                deepspeed_format.is_deepspeed_folder(checkpoint_dir):
            return checkpoint_dir  # pointed straight at a tag folder
        tag = layout.read_latest(checkpoint_dir)
        if tag is None:
            raise CheckpointError(f"no '{layout.LATEST}' file and no tag given", where=checkpoint_dir,
                                  hint="pass the tag (-t/--tag) or the tag folder itself")
    return layout.resolve_tag_dir(checkpoint_dir, str(tag))


def _open(tag_dir):
    """`(manifest, model states, reader)` of a dsrun or DeepSpeed tag folder."""
    if deepspeed_format.is_deepspeed_folder(tag_dir):
        checkpoint = deepspeed_format.DeepSpeedCheckpoint(tag_dir)
        return checkpoint.manifest, checkpoint.dsrun_states(), checkpoint
    manifest = layout.read_manifest(tag_dir)
    states = integrity.load_torch_file(tag_dir, layout.MODEL_STATES, manifest, weights_only=False)
    return manifest, states, ShardReader(tag_dir, manifest)


def iter_fp32_tensors(checkpoint_dir, tag=None, exclude_frozen_parameters=False):
    """Yield `(name, tensor)` in state-dict order: fp32 master weights for parameters (frozen ones too,
    unless excluded), buffers as saved, tied aliases as the same tensor object as their source. Every file
    read is checked against the manifest's checksums first; damage raises CheckpointError naming the file."""
    manifest, states, reader = _open(_tag_dir(checkpoint_dir, tag))
    module_state = states["module"]
    aliases = states.get("shared_params", {})
    params = manifest["params"]
    done = {}
    try:
        order = list(module_state) + [n for n in manifest["param_order"] if n not in module_state]
        for name in order:
            if name in aliases and aliases[name] in done:
                yield name, done[aliases[name]]
                continue
            info = params.get(name)
            if info is not None:
                if exclude_frozen_parameters and info["frozen"]:
                    continue
                if reader.has(name, "master"):
                    tensor = reader.read_full(name, "master").to(torch.float32)
                else:
                    tensor = module_state[name].to(torch.float32, copy=True)
            elif name in module_state:
                if name in states.get("frozen_param_names", ()) and exclude_frozen_parameters:
                    continue
                value = module_state[name]
                tensor = value.to(torch.float32, copy=True) if value.is_floating_point() else value.clone()
            else:
                continue
            done[name] = tensor
            yield name, tensor
    finally:
        reader.close()


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=None, exclude_frozen_parameters=False):
    """The fp32 state dict of a dsrun checkpoint (`checkpoint_dir` holds `latest`, or is a tag folder),
    loadable with `model.load_state_dict`. Works for any world size and ZeRO stage the checkpoint came from.
    """
    return OrderedDict(iter_fp32_tensors(checkpoint_dir, tag, exclude_frozen_parameters))


def convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_file, tag=None,
                                               exclude_frozen_parameters=False):
    """Write the fp32 state dict of a checkpoint to `output_file` (one `torch.save` file, atomic replace).
    An existing folder as `output_file` gets `pytorch_model.bin` inside it, as DeepSpeed's output_dir."""
    output_file = os.fspath(output_file)
    if os.path.isdir(output_file):
        output_file = os.path.join(output_file, "pytorch_model.bin")
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag, exclude_frozen_parameters)
    parent = os.path.dirname(os.path.abspath(output_file))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{output_file}.tmp-{os.getpid()}"
    torch_save_synced(state, tmp)  # removes its partial file and names it if the write fails
    os.replace(tmp, output_file)
    return output_file


def load_state_dict_from_zero_checkpoint(model, checkpoint_dir, tag=None):
    """Load the fp32 weights of a checkpoint into `model` (moved to CPU, `strict=False`) and return it."""
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    model = model.cpu()
    model.load_state_dict(state, strict=False)
    return model


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint_dir")
@click.argument("output_file")
@click.option("-t", "--tag", default=None, help="Checkpoint tag (default: the one in 'latest').")
@click.option("--exclude_frozen_parameters", is_flag=True, help="Leave frozen parameters out.")
def _command(checkpoint_dir, output_file, tag, exclude_frozen_parameters):
    """Convert a dsrun or DeepSpeed checkpoint into a PyTorch fp32 state dict file.

    CHECKPOINT_DIR holds 'latest' (or is a tag folder); OUTPUT_FILE is the file to write (or an existing
    folder: pytorch_model.bin inside it)."""
    try:
        path = convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_file, tag, exclude_frozen_parameters)
    except CheckpointError as err:
        click.echo(f"dsrun-to-fp32: {err}", err=True)
        return err.exit_code
    click.echo(f"wrote {path}")
    return 0


def main(argv=None):
    """Console entry point of `dsrun-to-fp32`; returns the exit code (2 for bad arguments, as argparse did)."""
    from dsrun.click_main import run_command
    return run_command(_command, argv, "dsrun-to-fp32")


if __name__ == "__main__":
    sys.exit(main())
