"""`DeepSpeedAccelerator`: the methods DeepSpeed's accelerator interface has, with what CUDA and CPU share.

Subclasses (cuda_accelerator.py, cpu_accelerator.py) fill in the device-specific parts. Method names
and defaults follow DeepSpeed's `abstract_accelerator.py`; `device_index=None` means the current device.
"""
from __future__ import annotations

import functools
from typing import List

import torch

__all__ = ["DeepSpeedAccelerator"]


class DeepSpeedAccelerator:
    _name = ""
    _communication_backend_name = ""
    _compile_backend = "inductor"

    # -- identity and synchronisation semantics --------------------------------------------------------
    def is_synchronized_device(self) -> bool:
        raise NotImplementedError

    def use_host_timers(self) -> bool:
        return self.is_synchronized_device()

    def resolves_data_dependency(self) -> bool:
        return self.is_synchronized_device()

    def handles_memory_backpressure(self) -> bool:
        return self.is_synchronized_device()

    def communication_backend_name(self) -> str:
        return self._communication_backend_name

    def is_triton_supported(self) -> bool:
        return False

    def get_compile_backend(self) -> str:
        return self._compile_backend

    def set_compile_backend(self, backend: str) -> None:
        self._compile_backend = backend

    # -- RNG --------------------------------------------------------------------------------------------
    def random(self):
        return torch.random

    def initial_seed(self) -> int:
        return torch.initial_seed()

    # -- data types -------------------------------------------------------------------------------------
    def supported_dtypes(self) -> List[torch.dtype]:
        dtypes = [torch.float]
        if self.is_fp16_supported():
            dtypes.append(torch.half)
        if self.is_bf16_supported():
            dtypes.append(torch.bfloat16)
        return dtypes

    def _tensor_factory(self, dtype):
        return functools.partial(torch.tensor, dtype=dtype, device=self.device_name())

    @property
    def BFloat16Tensor(self):
        return self._tensor_factory(torch.bfloat16)

    @property
    def ByteTensor(self):
        return self._tensor_factory(torch.uint8)

    @property
    def DoubleTensor(self):
        return self._tensor_factory(torch.double)

    @property
    def FloatTensor(self):
        return self._tensor_factory(torch.float)

    @property
    def HalfTensor(self):
        return self._tensor_factory(torch.half)

    @property
    def IntTensor(self):
        return self._tensor_factory(torch.int)

    @property
    def LongTensor(self):
        return self._tensor_factory(torch.long)

    # -- memory pinning and placement -------------------------------------------------------------------
    def pin_memory(self, tensor, make_copy=True, match_shape=True):
        return tensor.pin_memory() if torch.cuda.is_available() else tensor

    def is_pinned(self, tensor) -> bool:
        return tensor.is_pinned()

    def unpin_memory(self, tensor):
        return None

    def on_accelerator(self, tensor) -> bool:
        return tensor.device.type == self._name

    # -- ops and environment ----------------------------------------------------------------------------
    def op_builder_dir(self) -> str:
        return "dsrun.ops.op_builder"

    def create_op_builder(self, class_name):
        builder = self.get_op_builder(class_name)
        return builder() if builder is not None else None

    def get_op_builder(self, class_name):
        from dsrun.ops import op_builder
        return getattr(op_builder, class_name, None)

    def build_extension(self):
        from torch.utils.cpp_extension import BuildExtension
        return BuildExtension

    def export_envs(self) -> List[str]:
        return []

    def visible_devices_envs(self) -> List[str]:
        return []

    def set_visible_devices_envs(self, current_env, local_accelerator_ids) -> None:
        for env in self.visible_devices_envs():
            current_env[env] = ",".join(map(str, local_accelerator_ids))

    def lazy_call(self, callback):
        return callback()

    def range_push(self, msg, domain=None, category=None):
        return None

    def range_pop(self, domain=None):
        return None

    def __repr__(self) -> str:
        return f"<dsrun accelerator {self._name!r}>"
