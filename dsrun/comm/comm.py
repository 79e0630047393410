"""The collectives and group queries of `dsrun.comm` (see the package docstring).

`ReduceOp` is DeepSpeed's enum; torch's `torch.distributed.ReduceOp` values are accepted too. `AVG` on
a backend without a native average (gloo) is a sum divided by the group size. Every function that
needs a process group raises a `RuntimeError` naming the call when none is initialised.
"""
from __future__ import annotations

import enum
import os
from typing import Any, Optional

import torch
import torch.distributed as tdist

from dsrun.runtime.dist import init_distributed, local_rank

__all__ = ["ReduceOp", "init_distributed", "is_initialized", "is_available", "destroy_process_group", "new_group",
           "get_world_group", "get_rank", "get_world_size", "get_local_rank", "get_global_rank",
           "get_all_ranks_from_group", "get_backend", "barrier", "monitored_barrier", "broadcast",
           "broadcast_object_list", "all_reduce", "inference_all_reduce", "all_reduce_coalesced", "reduce",
           "all_gather", "all_gather_object", "all_gather_into_tensor", "allgather_fn", "all_gather_coalesced",
           "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_fn", "all_to_all_single", "all_to_all",
           "gather", "scatter", "send", "recv", "isend", "irecv", "has_all_gather_into_tensor",
           "has_reduce_scatter_tensor", "has_all_reduce_coalesced", "has_coalescing_manager", "configure",
           "log_summary"]


class ReduceOp(enum.Enum):
    """DeepSpeed's reduce operations (deepspeed.comm.ReduceOp)."""

    SUM = 0
    PRODUCT = 1
    MIN = 2
    MAX = 3
    BAND = 4
    BOR = 5
    BXOR = 6
    AVG = 7
    UNUSED = 8


def _require(what: str) -> None:
    if not tdist.is_initialized():
        raise RuntimeError(f"dsrun.comm.{what}: no process group is initialised; call dsrun.init_distributed() "
                           "(or dsrun.initialize) first")


def _torch_op(op):
    if isinstance(op, ReduceOp):
        if op is ReduceOp.UNUSED:
            raise ValueError("dsrun.comm: ReduceOp.UNUSED is not a reduce operation")
        return getattr(tdist.ReduceOp, "AVG" if op is ReduceOp.AVG else op.name)
    return op


def _is_avg(op) -> bool:
    return op is ReduceOp.AVG or op == tdist.ReduceOp.AVG


def _native_avg(group) -> bool:
    return tdist.get_backend(group) not in ("gloo", "mpi")


class _AverageOnWait:
    """The work handle of an emulated AVG: waiting finishes the sum, then divides by the group size."""

    def __init__(self, work, tensor, size: int):
        self._work, self._tensor, self._size, self._done = work, tensor, size, False

    def wait(self, timeout=None) -> bool:
        if not self._done:
            self._work.wait()
            self._tensor.div_(self._size)
            self._done = True
        return True

    def is_completed(self) -> bool:
        return self._done


def _reduce_with(fn, tensor, op, group, async_op, **kwargs):
    """Run reduce-like `fn`; AVG without a native average becomes SUM then a division."""
    if _is_avg(op) and not _native_avg(group):
        work = fn(tensor, op=tdist.ReduceOp.SUM, group=group, async_op=async_op, **kwargs)
        if async_op:
            return _AverageOnWait(work, tensor, tdist.get_world_size(group))
        tensor.div_(tdist.get_world_size(group))
        return None
    return fn(tensor, op=_torch_op(op), group=group, async_op=async_op, **kwargs)


# -- lifecycle and groups ---------------------------------------------------------------------------------

def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def is_available() -> bool:
    return tdist.is_available()


def destroy_process_group(group: Optional[Any] = None) -> None:
    _require("destroy_process_group")
    tdist.destroy_process_group(group)


def new_group(ranks):
    _require("new_group")
    return tdist.new_group(ranks)


def get_world_group():
    _require("get_world_group")
    return tdist.group.WORLD


def get_rank(group: Optional[Any] = None) -> int:
    _require("get_rank")
    return tdist.get_rank(group)


def get_world_size(group: Optional[Any] = None) -> int:
    _require("get_world_size")
    return tdist.get_world_size(group)


def get_local_rank() -> int:
    """This process's local rank, from the launcher's environment (LOCAL_RANK and the MPI/Slurm forms)."""
    _require("get_local_rank")
    return local_rank(os.environ)


def get_global_rank(group: Optional[Any] = None, group_rank: int = 0) -> int:
    _require("get_global_rank")
    if group is None or group is tdist.group.WORLD:
        return group_rank
    return tdist.get_global_rank(group, group_rank)


def get_all_ranks_from_group(group=None):
    _require("get_all_ranks_from_group")
    return list(range(tdist.get_world_size())) if group is None else tdist.get_process_group_ranks(group)


def get_backend(group=None) -> str:
    _require("get_backend")
    return tdist.get_backend(group)


def barrier(group=None, async_op=False, device_ids=None, prof=False, log_name="barrier", debug=None):
    _require("barrier")
    return tdist.barrier(group=group, async_op=async_op, device_ids=device_ids)


def monitored_barrier(group=None, timeout=None, wait_all_ranks=False):
    _require("monitored_barrier")
    return tdist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=wait_all_ranks)


# -- collectives --------------------------------------------------------------------------------------------

def broadcast(tensor, src, group=None, async_op=False, prof=False, log_name="broadcast", debug=None):
    _require("broadcast")
    return tdist.broadcast(tensor, src, group=group, async_op=async_op)


def broadcast_object_list(object_list, src, group=None, device=None):
    _require("broadcast_object_list")
    return tdist.broadcast_object_list(object_list, src, group=group, device=device)


def all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False, prof=False, log_name="all_reduce", debug=None):
    _require("all_reduce")
    return _reduce_with(tdist.all_reduce, tensor, op, group, async_op)


def inference_all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False, prof=False, log_name="all_reduce",
                         debug=None):
    """DeepSpeed's low-latency inference all-reduce; here the ordinary synchronous all-reduce."""
    _require("inference_all_reduce")
    _reduce_with(tdist.all_reduce, tensor, op, group, False)
    return tensor


def all_reduce_coalesced(tensors, op=ReduceOp.SUM, group=None, async_op=False, prof=False,
                         log_name="all_reduce", debug=None):
    _require("all_reduce_coalesced")
    for t in tensors:
        _reduce_with(tdist.all_reduce, t, op, group, False)
    return None


def reduce(tensor, dst, op=ReduceOp.SUM, group=None, async_op=False, prof=False, log_name="reduce", debug=None):
    _require("reduce")
    if _is_avg(op) and not _native_avg(group):
        tdist.reduce(tensor, dst, op=tdist.ReduceOp.SUM, group=group)
        if tdist.get_rank() == dst:
            tensor.div_(tdist.get_world_size(group))
        return None
    return tdist.reduce(tensor, dst, op=_torch_op(op), group=group, async_op=async_op)


def all_gather(tensor_list, tensor, group=None, async_op=False, prof=False, log_name="all_gather", debug=None):
    _require("all_gather")
    return tdist.all_gather(tensor_list, tensor, group=group, async_op=async_op)


def all_gather_object(object_list, obj, group=None, prof=False, log_name="all_gather_object", debug=None):
    _require("all_gather_object")
    return tdist.all_gather_object(object_list, obj, group=group)


def all_gather_into_tensor(output_tensor, tensor, group=None, async_op=False, prof=False,
                           log_name="all_gather_into_tensor", debug=None):
    _require("all_gather_into_tensor")
    return tdist.all_gather_into_tensor(output_tensor, tensor, group=group, async_op=async_op)


def allgather_fn(output_tensor, input_tensor, group=None, async_op=False, debug=None):
    return all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)


def all_gather_coalesced(output_tensors, input_tensors, group=None, async_op=False):
    _require("all_gather_coalesced")
    for out, inp in zip(output_tensors, input_tensors):
        tdist.all_gather_into_tensor(out, inp, group=group)
    return None


def reduce_scatter(output, input_list, op=ReduceOp.SUM, group=None, async_op=False, prof=False,
                   log_name="reduce_scatter", debug=None):
    _require("reduce_scatter")
    if tdist.get_backend(group) == "gloo":  # gloo has no reduce_scatter: reduce every chunk, keep ours
        return reduce_scatter_tensor(output, torch.cat([t.reshape(-1) for t in input_list]), op=op, group=group)
    return _reduce_with(lambda out, **kw: tdist.reduce_scatter(out, input_list, **kw), output, op, group, async_op)


def reduce_scatter_tensor(output_tensor, input_tensor, op=ReduceOp.SUM, group=None, async_op=False, prof=False,
                          log_name="reduce_scatter_tensor", debug=None):
    _require("reduce_scatter_tensor")
    if tdist.get_backend(group) == "gloo":  # gloo has no reduce_scatter: all-reduce a copy, keep our chunk
        full = input_tensor.clone()
        _reduce_with(tdist.all_reduce, full, op, group, False)
        rank, n = tdist.get_rank(group), output_tensor.numel()
        output_tensor.copy_(full.reshape(-1)[rank * n:(rank + 1) * n].view_as(output_tensor))
        return None
    return _reduce_with(lambda out, **kw: tdist.reduce_scatter_tensor(out, input_tensor, **kw), output_tensor, op,
                        group, async_op)


def reduce_scatter_fn(output_tensor, tensor, op=ReduceOp.SUM, group=None, async_op=False, prof=False, debug=None):
    return reduce_scatter_tensor(output_tensor, tensor, op=op, group=group, async_op=async_op)


def all_to_all_single(output, tensor, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False,
                      prof=False, log_name="all_to_all_single", debug=None):
    _require("all_to_all_single")
    return tdist.all_to_all_single(output, tensor, output_split_sizes=output_split_sizes,
                                   input_split_sizes=input_split_sizes, group=group, async_op=async_op)


def all_to_all(output_tensor_list, input_tensor_list, group=None, async_op=False):
    _require("all_to_all")
    return tdist.all_to_all(output_tensor_list, input_tensor_list, group=group, async_op=async_op)


def gather(tensor, gather_list=None, dst=0, group=None, async_op=False, prof=False, log_name="gather", debug=None):
    _require("gather")
    return tdist.gather(tensor, gather_list, dst=dst, group=group, async_op=async_op)


def scatter(tensor, scatter_list=None, src=0, group=None, async_op=False, prof=False, log_name="scatter",
            debug=None):
    _require("scatter")
    return tdist.scatter(tensor, scatter_list, src=src, group=group, async_op=async_op)


def send(tensor, dst, group=None, tag=0, prof=False, log_name="send", debug=None):
    _require("send")
    return tdist.send(tensor, dst, group=group, tag=tag)


def recv(tensor, src=None, group=None, tag=0, prof=False, log_name="recv", debug=None):
    _require("recv")
    return tdist.recv(tensor, src, group=group, tag=tag)


def isend(tensor, dst, group=None, tag=0, prof=False, log_name="isend", debug=None):
    _require("isend")
    return tdist.isend(tensor, dst, group=group, tag=tag)


def irecv(tensor, src=None, group=None, tag=0, prof=False, log_name="irecv", debug=None):
    _require("irecv")
    return tdist.irecv(tensor, src, group=group, tag=tag)


# -- capability queries and the comms logger --------------------------------------------------------------

def has_all_gather_into_tensor() -> bool:
    return True


def has_reduce_scatter_tensor() -> bool:
    return True


def has_all_reduce_coalesced() -> bool:
    return True


def has_coalescing_manager() -> bool:
    return False


def configure(deepspeed_config=None, enabled=None, prof_all=None, prof_ops=None, verbose=None, debug=None):
    """DeepSpeed's comms-logger switch. dsrun has no comms logger; asking to enable it is an error."""
    if enabled:
        raise NotImplementedError("dsrun.comm.configure(enabled=True): the DeepSpeed comms logger is not "
                                  "implemented by dsrun")


def log_summary(show_straggler=False, return_dict=False):
    """DeepSpeed prints the comms logger's table here; dsrun has no comms logger, so nothing was recorded."""
    return {} if return_dict else None
