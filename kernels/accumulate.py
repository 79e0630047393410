"""Gradient accumulation into fp32 buffers: `fp32_copy` starts a buffer, `accumulate_` adds to it.

Used where 16-bit gradients of successive micro-batches are summed in fp32 (the pipeline's stage
optimizer). The reference is PyTorch itself (`acc.add_(grad)`, `grad.float()`); on CUDA with Triton a
16-bit gradient goes through triton_accumulate.py's one-pass kernel, and the first copy through the
foreach copy, which casts vectorized (a casting `copy_`/`.float()` runs PyTorch's unrolled kernel).
"""
import torch

from . import fused_adam

__all__ = ["accumulate_", "fp32_copy", "MIN_TRITON_NUMEL"]

MIN_TRITON_NUMEL = 1 << 16  # smaller tensors: the launch costs more than the kernel saves


def _use_triton(acc: torch.Tensor, grad: torch.Tensor) -> bool:
    return (acc.is_cuda and acc.dtype == torch.float32 and grad.dtype in (torch.bfloat16, torch.float16)
            and acc.numel() >= MIN_TRITON_NUMEL and acc.shape == grad.shape and acc.is_contiguous()
            and grad.is_contiguous() and fused_adam.triton_available())


def accumulate_(acc: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """`acc += grad` in place (`acc` fp32, `grad` any float dtype of the same shape); returns `acc`."""
    if _use_triton(acc, grad):
        from .triton_accumulate import accumulate
        accumulate(acc, grad)
        return acc
    return acc.add_(grad)


def fp32_copy(grad: torch.Tensor) -> torch.Tensor:
    """A new fp32 tensor equal to `grad`."""
    if grad.dtype == torch.float32:
        return grad.clone()
    out = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    torch._foreach_copy_([out], [grad])
    return out
