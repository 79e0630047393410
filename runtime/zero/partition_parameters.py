"""DeepSpeed's module name `deepspeed.runtime.zero.partition_parameters`, for code that imports it.

The ZeRO-3 API lives in context.py (`Init`, `GatheredParameters`, `register_external_parameter`) and is
re-exported here. DeepSpeed's `Init` also patches torch's tensor constructors through
`zero_wrapper_for_fp_tensor_constructor` while a model is built; Hugging Face swaps that hook (around
`from_config` / `from_pretrained` under ZeRO-3) to keep `torch.arange`'s dtype. dsrun's `Init` patches no
constructors: a parameter is created as the module asks and cast to the shard dtype when it is
partitioned, buffers are left as created. So the hook and `_orig_torch_arange` exist for such code to
read and replace, and dsrun never calls the hook.
"""
import torch

from dsrun.accelerator import get_accelerator

from .context import GatheredParameters, Init, register_external_parameter

__all__ = ["Init", "GatheredParameters", "register_external_parameter", "zero_wrapper_for_fp_tensor_constructor",
           "get_accelerator"]

_orig_torch_arange = torch.arange


def zero_wrapper_for_fp_tensor_constructor(fn, target_fp_dtype, target_device=None):
    """DeepSpeed's constructor wrapper: `fn` creating floating tensors in `target_fp_dtype` on
    `target_device` unless the call names a device. Not used by dsrun's `Init` (see the module doc)."""

    def wrapped_fn(*args, **kwargs):
        if kwargs.get("device") is None and target_device is not None:
            kwargs["device"] = target_device
        tensor = fn(*args, **kwargs)
        return tensor.to(target_fp_dtype) if tensor.is_floating_point() else tensor

    return wrapped_fn
