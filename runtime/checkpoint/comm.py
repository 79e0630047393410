"""The few collectives a checkpoint save/load needs, over the default process group (or none at one rank).

Every step that can fail on some ranks ends in `raise_if_any`, so all ranks raise together and none is
left waiting in a later collective.
"""
from __future__ import annotations

from dsrun.runtime.checkpoint.errors import CheckpointError

__all__ = ["Comm"]


class Comm:
    """Rank, world size and the collectives of a save/load, taken from the default process group."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.world_size = self.dist.get_world_size() if self.dist else 1

    def all_gather(self, obj):
        if self.dist is None:
            return [obj]
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.dist is not None:
            self.dist.barrier()

    def raise_if_any(self, error, what, value=None):
        """All ranks raise together if any rank failed (no rank is left waiting in a collective); else
        returns every rank's `value`. A rank that failed raises its own CheckpointError as it is (it names
        the file); the others say which rank failed and why."""
        results = self.all_gather((None if error is None else f"{type(error).__name__}: {error}", value))
        failed = [(r, e) for r, (e, _) in enumerate(results) if e is not None]
        if not failed:
            return [v for _, v in results]
        if isinstance(error, CheckpointError):
            raise error
        detail = "; ".join(f"rank {r}: {e}" for r, e in failed)
        if error is not None:
            raise CheckpointError(f"{what} failed on rank {self.rank}: {error}") from error
        raise CheckpointError(f"{what} failed on {len(failed)} rank(s): {detail}")
