"""Load DeepSpeed-made checkpoints in dsrun and continue each run (launched by test_deepspeed_checkpoints.py).

For every variant folder under --fixtures: build the same model and config as make_ds_checkpoints.py,
`engine.load_checkpoint(folder)`, train the steps DeepSpeed trained after saving, and record the mean
loss over ranks. Rank 0 writes {variant: {"losses", "fresh_loss", "global_steps", "client_state", "lr"}} to
--out; `fresh_loss` is the first step's loss of the model before loading (the test's control). With --save,
each continued run is then saved as a dsrun checkpoint in <save>/<variant>.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

import dsrun as deepspeed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures"))
import ds_fixture_common as common  # noqa: E402


def continue_run(folder, variant, rank, world_size, save_dir=None, stage=None):
    model = common.build_model()
    config = common.ds_config(variant, world_size)
    if stage is not None:  # continue at another ZeRO stage than DeepSpeed saved at
        config["zero_optimization"]["stage"] = stage
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    dtype = common.DTYPES[common.VARIANTS[variant]["dtype"]]
    x, y = common.rank_batch(common.STEPS_BEFORE, rank, world_size)
    with torch.no_grad():  # the control: where the fresh model, not loaded, would start
        fresh = torch.nn.functional.mse_loss(engine(x.to(dtype)).float(), y.float())
    dist.all_reduce(fresh)
    _, client_state = engine.load_checkpoint(folder)
    record = {"global_steps": engine.global_steps, "lr": engine.get_lr()[0], "fresh_loss": fresh.item() / world_size,
              "client_state": {k: client_state.get(k) for k in ("epoch", "note")}, "losses": []}
    for step in range(common.STEPS_BEFORE, common.STEPS_BEFORE + common.STEPS_AFTER):
        x, y = common.rank_batch(step, rank, world_size)
        loss = torch.nn.functional.mse_loss(engine(x.to(dtype)).float(), y.float())
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        record["losses"].append(mean.item() / world_size)
    if save_dir:
        engine.save_checkpoint(os.path.join(save_dir, variant))
    return record


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixtures", required=True)
    parser.add_argument("--variants", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", default=None, help="save each continued run here as a dsrun checkpoint")
    parser.add_argument("--cross", default="", help="VARIANT:STAGE,...: also continue VARIANT at ZeRO STAGE")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results = {v: continue_run(os.path.join(args.fixtures, v), v, rank, world_size, args.save)
               for v in args.variants.split(",")}
    for item in filter(None, args.cross.split(",")):
        variant, stage = item.split(":")
        results[item] = continue_run(os.path.join(args.fixtures, variant), variant, rank, world_size,
                                     stage=int(stage))
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
