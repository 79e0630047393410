"""The CPU accelerator (DeepSpeed's `CPU_Accelerator`): one "device" per local rank, memory figures from
the process's resident set size, no-op streams and synchronisation, gloo for collectives."""
from __future__ import annotations

import contextlib
import os
import time

import torch

from .abstract_accelerator import DeepSpeedAccelerator

__all__ = ["CPU_Accelerator"]


class _Stream:
    """A CPU "stream": work runs in order on the host, so every method is immediate."""

    def __init__(self, *args, **kwargs):
        pass

    def synchronize(self):
        return None

    def wait_stream(self, stream):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        event = event or _Event()
        event.record()
        return event

    def query(self) -> bool:
        return True


class _Event:
    """A CPU "event": a host timestamp (elapsed_time in milliseconds, as CUDA events)."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self._time = None

    def record(self, stream=None):
        self._time = time.perf_counter()

    def synchronize(self):
        return None

    def wait(self, stream=None):
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event) -> float:
        return (end_event._time - self._time) * 1000.0


class CPU_Accelerator(DeepSpeedAccelerator):
    _name = "cpu"
    _communication_backend_name = "gloo"

    def __init__(self):
        self._max_rss = 0

    def is_synchronized_device(self) -> bool:
        return True

    # -- devices ----------------------------------------------------------------------------------------
    def device_name(self, device_index=None) -> str:
        return "cpu"

    def device(self, device_index=None):
        return torch.device("cpu")

    def set_device(self, device_index) -> None:
        return None

    def current_device(self) -> int:
        from dsrun.runtime.dist import local_rank
        return local_rank(os.environ)

    def current_device_name(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        """Local ranks on this node (LOCAL_SIZE / LOCAL_WORLD_SIZE from the launcher), else 1."""
        for name in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
            if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 0:
                return int(os.environ[name])
        return 1

    def synchronize(self, device_index=None):
        return None

    def is_available(self) -> bool:
        return True

    def is_bf16_supported(self) -> bool:
        return True

    def is_fp16_supported(self) -> bool:
        return True  # torch runs fp16 on CPU (slowly without AVX512-FP16); dsrun's CPU tests use it

    # -- RNG --------------------------------------------------------------------------------------------
    def set_rng_state(self, new_state, device_index=None):
        return torch.set_rng_state(new_state)

    def get_rng_state(self, device_index=None):
        return torch.get_rng_state()

    def manual_seed(self, seed):
        return torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        return torch.manual_seed(seed)

    def default_generator(self, device_index):
        return torch.default_generator

    # -- streams and events -----------------------------------------------------------------------------
    @property
    def Stream(self):
        return _Stream

    def stream(self, stream):
        return contextlib.nullcontext()

    def current_stream(self, device_index=None):
        return _Stream()

    def default_stream(self, device_index=None):
        return _Stream()

    @property
    def Event(self):
        return _Event

    def create_graph(self):
        return None

    def capture_to_graph(self, graph, pool=None, stream=None):
        return contextlib.nullcontext()

    def replay_graph(self, graph):
        return None

    # -- memory: the process's resident set size (DeepSpeed's CPU accelerator does the same) -----------
    def _rss(self) -> int:
        import psutil
        rss = psutil.Process().memory_info().rss
        self._max_rss = max(self._max_rss, rss)
        return rss

    def empty_cache(self):
        return None

    def memory_allocated(self, device_index=None) -> int:
        return self._rss()

    def max_memory_allocated(self, device_index=None) -> int:
        self._rss()
        return self._max_rss

    def reset_max_memory_allocated(self, device_index=None):
        self._max_rss = 0
        self._rss()

    memory_cached = memory_reserved = memory_allocated
    max_memory_cached = max_memory_reserved = max_memory_allocated
    reset_max_memory_cached = reset_peak_memory_stats = reset_max_memory_allocated

    def memory_stats(self, device_index=None):
        current = self._rss()
        return {"allocated_bytes.all.current": current, "allocated_bytes.all.peak": self._max_rss}

    def total_memory(self, device_index=None) -> int:
        import psutil
        return psutil.virtual_memory().total

    def available_memory(self, device_index=None) -> int:
        import psutil
        return psutil.virtual_memory().available

    def pin_memory(self, tensor, make_copy=True, match_shape=True):
        return tensor

    def is_pinned(self, tensor) -> bool:
        return False

    def on_accelerator(self, tensor) -> bool:
        return tensor.device.type == "cpu"
