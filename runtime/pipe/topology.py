"""Process grids for pipeline parallelism: DeepSpeed's `ProcessTopology` family (pure: rank <-> coordinate
arithmetic, no processes) and `PipelineParallelGrid` (the process groups of one topology).

    topo = PipeDataParallelTopology(num_pp=2, num_dp=2)   # axes ['pipe', 'data'], data innermost
    topo.get_coord(3)            -> ProcessCoord(pipe=1, data=1)
    topo.get_rank(pipe=1, data=0) -> 2
    topo.get_axis_comm_lists('data') -> [[0, 1], [2, 3]]      # the data-parallel groups

Ranks are laid out row-major over the axes in order (the last axis varies fastest), as DeepSpeed: with
['pipe', 'data'] the ranks of one stage are adjacent, so data-parallel all-reduces stay within a node.

[Note: deterministic group creation] Every rank creates every group of a grid, in one fixed order
(pipe groups, data groups, then tie groups by sorted key in module.py), whichever groups it belongs to:
`dist.new_group` is collective over the world, so a rank that skipped or reordered one would block the
others (DeepSpeed #4589: a second PipelineModule blocking init; PR #7208: unsorted tie keys hanging).
"""
from __future__ import annotations

from collections import namedtuple
from itertools import product
from typing import Dict, List, Sequence

__all__ = ["ProcessTopology", "PipeDataParallelTopology", "PipeModelDataParallelTopology", "PipelineParallelGrid"]


class ProcessTopology:
    """A cartesian grid of ranks over named axes (DeepSpeed's `ProcessTopology(axes, dims)`)."""

    def __init__(self, axes: Sequence[str], dims: Sequence[int]):
        if len(axes) != len(dims) or any(d < 1 for d in dims):
            raise ValueError(f"axes {list(axes)} and dims {list(dims)} must pair up, each dim >= 1")
        self.axes, self.dims = list(axes), list(dims)
        self.ProcessCoord = namedtuple("ProcessCoord", self.axes)
        self.mapping: Dict = {}
        for rank, coord in enumerate(product(*(range(d) for d in self.dims))):
            self.mapping[self.ProcessCoord(*coord)] = rank

    def get_rank(self, **coord_kwargs) -> int:
        """The rank at a full coordinate (every axis named)."""
        if len(coord_kwargs) != len(self.axes):
            raise ValueError(f"get_rank() needs every axis {self.axes}, got {sorted(coord_kwargs)}")
        key = self.ProcessCoord(**coord_kwargs)
        if key not in self.mapping:
            raise ValueError(f"coordinate {coord_kwargs} is outside the topology {dict(zip(self.axes, self.dims))}")
        return self.mapping[key]

    def get_axis_names(self) -> List[str]:
        return list(self.axes)

    def get_rank_repr(self, rank: int, omit_axes=("data", "pipe"), inner_sep: str = "_", outer_sep: str = "-") -> str:
        """'model_01'-style name of a rank's coordinate without `omit_axes` (checkpoint file names)."""
        coord = self.get_coord(rank)
        return outer_sep.join(f"{ax}{inner_sep}{getattr(coord, ax):02d}" for ax in self.axes if ax not in omit_axes)

    def get_dim(self, axis: str) -> int:
        """Size of `axis`, 0 when the topology has no such axis."""
        return self.dims[self.axes.index(axis)] if axis in self.axes else 0

    def get_coord(self, rank: int):
        for coord, r in self.mapping.items():
            if r == rank:
                return coord
        raise ValueError(f"rank {rank} is not in the topology (world size {self.world_size()})")

    def get_axis_comm_lists(self, axis: str) -> List[List[int]]:
        """The rank lists that vary only along `axis` (one process group each), in coordinate order."""
        if axis not in self.axes:
            return []
        others = [a for a in self.axes if a != axis]
        lists = []
        for coord in product(*(range(self.get_dim(a)) for a in others)):
            fixed = dict(zip(others, coord))
            lists.append([self.get_rank(**fixed, **{axis: i}) for i in range(self.get_dim(axis))])
        return lists

    def filter_match(self, **filter_kwargs) -> List[int]:
        """Ranks whose coordinate matches every given axis value, in rank order."""
        return sorted(r for c, r in self.mapping.items()
                      if all(getattr(c, k) == v for k, v in filter_kwargs.items()))

    def get_axis_list(self, axis: str, idx: int) -> List[int]:
        """Ranks whose coordinate along `axis` is `idx`."""
        return self.filter_match(**{axis: idx}) if axis in self.axes else []

    def world_size(self) -> int:
        return len(self.mapping)

    def __str__(self) -> str:
        return str(self.mapping)


class PipeDataParallelTopology(ProcessTopology):
    """Axes ['pipe', 'data'] (data innermost)."""

    def __init__(self, num_pp: int, num_dp: int):
        super().__init__(axes=["pipe", "data"], dims=[num_pp, num_dp])


class PipeModelDataParallelTopology(ProcessTopology):
    """Axes ['pipe', 'data', 'model'] (tensor-parallel innermost)."""

    def __init__(self, num_pp: int, num_mp: int, num_dp: int):
        super().__init__(axes=["pipe", "data", "model"], dims=[num_pp, num_dp, num_mp])


class PipelineParallelGrid:
    """The process groups of a topology, for this rank: its pipe group (one rank per stage, same data
    coordinate) and its data-parallel group (the ranks of its stage). Collective to build: every rank
    creates every group ([Note: deterministic group creation]). DeepSpeed's `mpu` methods included."""

    def __init__(self, topology: ProcessTopology, process_group=None):
        import torch.distributed as dist
        self._topo = topology
        self.global_rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if topology.world_size() != self.world_size:
            raise RuntimeError(f"the pipeline topology has {topology.world_size()} ranks but the world has "
                               f"{self.world_size}")
        self.data_parallel_size = max(topology.get_dim("data"), 1)
        self.pipe_parallel_size = max(topology.get_dim("pipe"), 1)
        self.model_parallel_size = max(topology.get_dim("model"), 1)
        self.slice_parallel_size = self.model_parallel_size
        coord = topology.get_coord(self.global_rank)
        self.stage_id = coord.pipe
        self.data_parallel_id = getattr(coord, "data", 0)
        self.pp_group = self.dp_group = None
        self.pp_proc_group = self.dp_proc_group = None
        for ranks in topology.get_axis_comm_lists("pipe"):
            group = dist.new_group(ranks=ranks)
            if self.global_rank in ranks:
                self.pp_group, self.pp_proc_group = ranks, group
        # no data axis: each rank is its own data-parallel group (still created by every rank, in order)
        data_lists = topology.get_axis_comm_lists("data") or [[r] for r in range(self.world_size)]
        for ranks in data_lists:
            group = dist.new_group(ranks=ranks)
            if self.global_rank in ranks:
                self.dp_group, self.dp_proc_group = ranks, group
        self.is_first = self.stage_id == 0
        self.is_last = self.stage_id == self.pipe_parallel_size - 1

    @property
    def topology(self) -> ProcessTopology:
        return self._topo

    def get_stage_id(self) -> int:
        return self.stage_id

    def get_data_parallel_id(self) -> int:
        return self.data_parallel_id

    def stage_to_global(self, stage_id: int, **kwargs) -> int:
        """The global rank of `stage_id` with this rank's other coordinates (overridable by kwargs)."""
        coord = self._topo.get_coord(self.global_rank)._asdict()
        coord.update(pipe=stage_id, **kwargs)
        return self._topo.get_rank(**coord)

    def is_first_stage(self) -> bool:
        return self.is_first

    def is_last_stage(self) -> bool:
        return self.is_last

    # -- DeepSpeed's mpu interface ----------------------------------------------------------------------

    def get_global_rank(self) -> int:
        return self.global_rank

    def get_pipe_parallel_rank(self) -> int:
        return self.stage_id

    def get_pipe_parallel_world_size(self) -> int:
        return self.pipe_parallel_size

    def get_pipe_parallel_group(self):
        return self.pp_proc_group

    def get_data_parallel_rank(self) -> int:
        return self.data_parallel_id

    def get_data_parallel_world_size(self) -> int:
        return self.data_parallel_size

    def get_data_parallel_group(self):
        return self.dp_proc_group

    def get_model_parallel_rank(self) -> int:
        return getattr(self._topo.get_coord(self.global_rank), "model", 0)

    def get_model_parallel_world_size(self) -> int:
        return self.model_parallel_size

    def get_slice_parallel_rank(self) -> int:
        return self.get_model_parallel_rank()

    def get_slice_parallel_world_size(self) -> int:
        return self.slice_parallel_size
