"""`dsrun.comm` on 2 gloo ranks (issue 16 part 1)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "runtime"))
from _dist import run_ranks  # noqa: E402


def _collectives(rank, world):
    import dsrun.comm as dist
    from dsrun.comm import ReduceOp

    out = {"init": dist.is_initialized(), "rank": dist.get_rank(), "world": dist.get_world_size(),
           "local": dist.get_local_rank(), "backend": dist.get_backend()}
    dist.init_distributed()  # idempotent
    dist.barrier()
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    out["sum"] = t.item()
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t, op=ReduceOp.AVG)  # gloo has no AVG: sum / world
    out["avg"] = t.item()
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t, op=ReduceOp.AVG, async_op=True).wait()
    out["avg_async"] = t.item()
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t, op=torch.distributed.ReduceOp.MAX)  # torch's ops are accepted too
    out["max"] = t.item()
    t = torch.tensor([rank + 1.0])
    out["inference"] = dist.inference_all_reduce(t).item()
    t = torch.tensor([float(rank)])
    dist.broadcast(t, src=1)
    out["bcast"] = t.item()
    parts = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(parts, torch.tensor([rank * 10.0]))
    out["gather"] = [p.item() for p in parts]
    flat = torch.zeros(world)
    dist.all_gather_into_tensor(flat, torch.tensor([rank * 10.0]))
    out["gather_flat"] = flat.tolist()
    mine = torch.zeros(1)
    dist.reduce_scatter_tensor(mine, torch.tensor([1.0, 2.0]) * (rank + 1))
    out["reduce_scatter"] = mine.item()
    objs = [None] * world
    dist.all_gather_object(objs, {"r": rank})
    out["objects"] = objs
    group = dist.new_group([0, 1])
    t = torch.tensor([1.0])
    dist.all_reduce(t, group=group)
    out["group_sum"] = t.item()
    out["ranks"] = dist.get_all_ranks_from_group(dist.get_world_group())
    return out


def test_comm_functions_on_two_gloo_ranks():
    results = run_ranks(_collectives, world_size=2)
    for rank, out in enumerate(results):
        assert (out["init"], out["rank"], out["world"], out["local"], out["backend"]) == (True, rank, 2, rank, "gloo")
        assert (out["sum"], out["avg"], out["avg_async"], out["max"]) == (3.0, 1.5, 1.5, 2.0)
        assert (out["inference"], out["bcast"]) == (3.0, 1.0)
        assert out["gather"] == out["gather_flat"] == [0.0, 10.0]
        assert out["reduce_scatter"] == [3.0, 6.0][rank]  # chunk `rank` of (1,2)*1 + (1,2)*2
        assert out["objects"] == [{"r": 0}, {"r": 1}]
        assert out["group_sum"] == 2.0 and out["ranks"] == [0, 1]


def test_comm_without_a_process_group_names_the_call():
    import dsrun.comm as dist
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"dsrun.comm.get_rank: no process group is initialised"):
        dist.get_rank()
