"""Triton kernel for gradient accumulation in fp32: `acc += grad` with a 16-bit `grad` (accumulate.py).

One pass, 10 bytes per element (16-bit read, fp32 read and write). PyTorch's own mixed-dtype `add_`
runs its unrolled (non-vectorized) elementwise kernel; on the B3 pipeline stage it moved ~2.3 TB/s on an
H200 (41 ms of a 1.3 s batch, RESULTS.md 2026-11-30). Imported only where Triton and a GPU exist.
"""
import triton
import triton.language as tl

__all__ = ["accumulate"]

BLOCK, WARPS = 4096, 8


@triton.jit
def _accumulate_kernel(ACC, G, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(ACC + offs, mask=mask)
    g = tl.load(G + offs, mask=mask).to(tl.float32)
    tl.store(ACC + offs, acc + g, mask=mask)


def accumulate(acc, grad) -> None:
    """`acc += grad` on same-length contiguous tensors, `acc` fp32."""
    n = acc.numel()
    if n:
        _accumulate_kernel[(triton.cdiv(n, BLOCK),)](acc, grad, n, BLOCK=BLOCK, num_warps=WARPS)
