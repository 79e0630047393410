"""RNG state for activation checkpointing: DeepSpeed's `CudaRNGStatesTracker` and
`model_parallel_cuda_manual_seed`, on the current accelerator's generator (CUDA on a GPU, the CPU
generator on the CPU accelerator), so that Megatron-style code runs unchanged on both.

Contract: `checkpoint` captures the CPU generator, the CUDA generator (when CUDA is initialised) and
every tracker state at forward time, and recompute runs under exactly those states, so dropout masks
are the same in the forward and the recompute.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch

__all__ = ["CudaRNGStatesTracker", "get_cuda_rng_tracker", "model_parallel_cuda_manual_seed", "capture_rng_states",
           "restore_rng_states", "MODEL_PARALLEL_RNG_TRACKER_NAME"]

MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"


def _accelerator():
    from dsrun.accelerator import get_accelerator
    return get_accelerator()


class CudaRNGStatesTracker:
    """Named generator states (`add`, `fork`, `get_states`, `set_states`, `reset`), as DeepSpeed's and
    Megatron's tracker: `fork(name)` runs its block under that name's state and saves the advanced state
    back, leaving the default generator as it was."""

    def __init__(self):
        self.states_: Dict[str, torch.Tensor] = {}
        self.seeds_ = set()

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> Dict[str, torch.Tensor]:
        """A copy of the name -> state map (the tensors are not cloned: states are replaced, never
        mutated)."""
        return dict(self.states_)

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        """Register `name` with a generator state seeded by `seed`. Raises if the seed or name is taken."""
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        self.seeds_.add(seed)
        acc = _accelerator()
        orig = acc.get_rng_state()
        acc.manual_seed(seed)
        self.states_[name] = acc.get_rng_state()
        acc.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        acc = _accelerator()
        orig = acc.get_rng_state()
        acc.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = acc.get_rng_state()
            acc.set_rng_state(orig)


_TRACKER = CudaRNGStatesTracker()


def get_cuda_rng_tracker() -> CudaRNGStatesTracker:
    return _TRACKER


def model_parallel_cuda_manual_seed(seed: int, mpu=None) -> None:
    """Seed the default generator with `seed` (same on every model-parallel rank: data-parallel
    regions) and the tracker's 'model-parallel-rng' with `seed + 2718 + model-parallel rank` (different
    per rank: dropout inside tensor-parallel regions), as DeepSpeed/Megatron do. `mpu` defaults to the
    one given to `configure`."""
    if mpu is None:
        from .settings import SETTINGS
        mpu = SETTINGS.mpu
    tp_rank = mpu.get_model_parallel_rank() if mpu is not None else 0
    _TRACKER.reset()
    _accelerator().manual_seed(seed)
    _TRACKER.add(MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def capture_rng_states() -> tuple:
    """(cpu state, cuda state or None, tracker states) now."""
    return (torch.get_rng_state(), torch.cuda.get_rng_state() if _cuda_ready() else None, _TRACKER.get_states())


def restore_rng_states(states: tuple) -> None:
    cpu, cuda, tracker = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    _TRACKER.set_states(tracker)


@contextlib.contextmanager
def rng_states_of(states: Optional[tuple]):
    """Run the block under `states` (from capture_rng_states) and put the current states back after."""
    if states is None:
        yield
        return
    current = capture_rng_states()
    restore_rng_states(states)
    try:
        yield
    finally:
        restore_rng_states(current)
