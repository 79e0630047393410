#!/usr/bin/env python
"""Convert a dsrun checkpoint into a PyTorch fp32 state dict, with nothing but torch installed.

dsrun copies this file into every checkpoint directory as `zero_to_fp32.py`, as DeepSpeed does with its own,
so the weights can be recovered wherever the checkpoint goes:

    python zero_to_fp32.py . pytorch_model.bin            # the tag named in 'latest'
    python zero_to_fp32.py . out_dir/ -t global_step100   # an existing folder gets pytorch_model.bin

It reads the layout described in [Note: checkpoint format] (dsrun/runtime/checkpoint/__init__.py):
`<tag>/checkpoint.json` lists the parameters and which element ranges each `zero_shard_rank{r}.pt` holds;
each parameter's fp32 master weight is stitched from those ranges, buffers come from
`mp_rank_00_model_states.pt`, tied weights share one tensor. With dsrun installed, `dsrun-to-fp32` does the
same and also verifies the files' checksums. This file must import nothing outside torch and the
standard library.
"""
import argparse
import json
import os
import sys
from collections import OrderedDict

import torch


def _tag_dir(checkpoint_dir, tag):
    if tag is None:
        if os.path.isfile(os.path.join(checkpoint_dir, "checkpoint.json")):
            return checkpoint_dir
        latest = os.path.join(checkpoint_dir, "latest")
        if not os.path.isfile(latest):
            sys.exit(f"zero_to_fp32: no 'latest' file in {checkpoint_dir}: pass the tag with -t")
        with open(latest) as f:
            tag = f.read().strip()
    path = os.path.join(checkpoint_dir, tag)
    if not os.path.isfile(os.path.join(path, "checkpoint.json")):
        sys.exit(f"zero_to_fp32: {path} is not a dsrun checkpoint folder (no checkpoint.json)")
    return path


def _stitch(tag_dir, manifest, name, info, shard_cache):
    """The fp32 master of `name`, stitched from the element ranges the shard files hold, or None."""
    pieces = sorted((start, end, file) for file, names in manifest["shards"].items()
                    for start, end in names.get(name, []))
    if not pieces:
        return None
    out = torch.empty(info["numel"], dtype=torch.float32)
    for start, end, file in pieces:
        if file not in shard_cache:
            shard_cache[file] = torch.load(os.path.join(tag_dir, file), map_location="cpu", weights_only=True)
        entry = next(e for e in shard_cache[file]["entries"][name] if e["start"] == start)
        if "master" not in entry:
            return None
        out[start:end].copy_(entry["master"])
    return out.view(info["shape"])


def fp32_state_dict(checkpoint_dir, tag=None, exclude_frozen_parameters=False):
    """The fp32 state dict of the checkpoint, in the module's state-dict order."""
    tag_dir = _tag_dir(checkpoint_dir, tag)
    with open(os.path.join(tag_dir, "checkpoint.json")) as f:
        manifest = json.load(f)
    states = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                        weights_only=False)
    module_state, aliases = states["module"], states.get("shared_params", {})
    frozen = set(states.get("frozen_param_names", []))
    params, cache, out = manifest["params"], {}, OrderedDict()
    for name in list(module_state) + [n for n in manifest["param_order"] if n not in module_state]:
        if name in aliases and aliases[name] in out:
            out[name] = out[aliases[name]]
            continue
        info = params.get(name)
        if exclude_frozen_parameters and ((info is not None and info["frozen"]) or name in frozen):
            continue
        tensor = _stitch(tag_dir, manifest, name, info, cache) if info is not None else None
        if tensor is None and name in module_state:
            value = module_state[name]
            tensor = value.to(torch.float32, copy=True) if value.is_floating_point() else value.clone()
        if tensor is not None:
            out[name] = tensor
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a dsrun checkpoint into a PyTorch fp32 state dict.")
    parser.add_argument("checkpoint_dir", help="the folder holding 'latest' (or a tag folder)")
    parser.add_argument("output_file", help="file to write (an existing folder gets pytorch_model.bin)")
    parser.add_argument("-t", "--tag", default=None, help="checkpoint tag (default: the one in 'latest')")
    parser.add_argument("--exclude_frozen_parameters", action="store_true", help="leave frozen parameters out")
    args = parser.parse_args(argv)
    output = args.output_file
    if os.path.isdir(output):
        output = os.path.join(output, "pytorch_model.bin")
    state = fp32_state_dict(args.checkpoint_dir, args.tag, args.exclude_frozen_parameters)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    torch.save(state, output)
    print(f"wrote {output} ({len(state)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
