"""Triton kernels for the GPU fused Adam/AdamW step: one flat form and one multi-tensor form.

Both compute in fp32 and load/store each tensor in its own dtype, so one kernel covers fp32,
all-bf16 (bf16 params and states) and mixed precision (fp32 master and states, 16-bit grads in,
16-bit params out through `out`). Imported only where Triton and a GPU exist (fused_adam.py).

[Note: multi-tensor launch] The multi-tensor form is one launch over many tensors: the host builds a
table of per-tensor addresses (int64, cast back to typed pointers in the kernel, as Triton's grouped
GEMM tutorial does) and a table of (tensor index, block start) per program. The block table depends
only on the sizes and is cached; the address table is rebuilt per call (grads move between steps).
"""
import torch
import triton
import triton.language as tl

__all__ = ["adam_flat", "adam_multi", "CONFIG", "config_for"]

# (elements per program, warps) by param element size in bytes: the winners of the flat-kernel sweep
# in benchmarks/bench_gpu_adam.py on one H200 (2026-11-22, RESULTS.md). Every config from 1024 to
# 4096 elements and 4 to 16 warps was within 3% there; 8192 was slower.
CONFIG = {4: (1024, 4), 2: (1024, 4), 1: (4096, 8)}
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # a NaN or inf grad_scale fails `abs(x) <= FLT_MAX`


def config_for(dtype):
    """(BLOCK, num_warps) for params of this dtype."""
    return CONFIG[dtype.itemsize]


@triton.jit
def _adam_update(p, g, m, v, neg_step, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, decay, wd,
                 ADAMW: tl.constexpr, HAS_WD: tl.constexpr):
    if HAS_WD:
        if ADAMW:
            p = p * decay
        else:
            g = g + p * wd
    m = m + one_minus_b1 * (g - m)
    v = v * b2 + one_minus_b2 * g * g
    denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p + (neg_step * m) / denom
    return p, m, v


@triton.jit
def _adam_flat_kernel(P, G, M, V, OUT, n, GSCALE, neg_step, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, decay,
                      wd, ADAMW: tl.constexpr, HAS_WD: tl.constexpr, HAS_OUT: tl.constexpr,
                      GSCALE_PTR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(P + offs, mask=mask).to(tl.float32)
    if GSCALE_PTR:  # a device scalar (the clip coefficient, computed without a host sync)
        gscale = tl.load(GSCALE).to(tl.float32)
        mask = mask & (tl.abs(gscale) <= FLT_MAX)  # [Note: non-finite grad_scale skips] in fused_adam.py
    else:
        gscale = GSCALE
    g = tl.load(G + offs, mask=mask).to(tl.float32) * gscale
    m = tl.load(M + offs, mask=mask).to(tl.float32)
    v = tl.load(V + offs, mask=mask).to(tl.float32)
    p, m, v = _adam_update(p, g, m, v, neg_step, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, decay, wd,
                           ADAMW, HAS_WD)
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)
    tl.store(M + offs, m.to(M.dtype.element_ty), mask=mask)
    tl.store(V + offs, v.to(V.dtype.element_ty), mask=mask)
    if HAS_OUT:
        tl.store(OUT + offs, p.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _adam_multi_kernel(ADDR, SIZES, BLK_TENSOR, BLK_START, neg_step, one_minus_b1, b2, one_minus_b2, bc2_sqrt,
                       eps, decay, wd, P_T: tl.constexpr, G_T: tl.constexpr, S_T: tl.constexpr,
                       O_T: tl.constexpr, ADAMW: tl.constexpr, HAS_WD: tl.constexpr, HAS_OUT: tl.constexpr,
                       BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(BLK_TENSOR + pid).to(tl.int64)
    start = tl.load(BLK_START + pid)
    n = tl.load(SIZES + t)
    P = tl.load(ADDR + t * 5 + 0).to(tl.pointer_type(P_T))
    G = tl.load(ADDR + t * 5 + 1).to(tl.pointer_type(G_T))
    M = tl.load(ADDR + t * 5 + 2).to(tl.pointer_type(S_T))
    V = tl.load(ADDR + t * 5 + 3).to(tl.pointer_type(S_T))
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(P + offs, mask=mask).to(tl.float32)
    g = tl.load(G + offs, mask=mask).to(tl.float32)
    m = tl.load(M + offs, mask=mask).to(tl.float32)
    v = tl.load(V + offs, mask=mask).to(tl.float32)
    p, m, v = _adam_update(p, g, m, v, neg_step, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, decay, wd,
                           ADAMW, HAS_WD)
    tl.store(P + offs, p.to(P_T), mask=mask)
    tl.store(M + offs, m.to(S_T), mask=mask)
    tl.store(V + offs, v.to(S_T), mask=mask)
    if HAS_OUT:
        O = tl.load(ADDR + t * 5 + 4).to(tl.pointer_type(O_T))
        tl.store(O + offs, p.to(O_T), mask=mask)


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _scalars(lr, beta1, beta2, eps, weight_decay, bc1, bc2):
    import math
    return (-(lr / bc1), 1.0 - beta1, beta2, 1.0 - beta2, math.sqrt(bc2), eps, 1.0 - lr * weight_decay,
            weight_decay)


def adam_flat(param, grad, exp_avg, exp_avg_sq, out, *, lr, beta1, beta2, eps, weight_decay, bc1, bc2,
              adamw_mode, grad_scale=1.0, block=None, num_warps=None):
    """One step on same-length contiguous CUDA tensors (ZeRO partitions), in place; the gradient is
    multiplied by `grad_scale` (a float, or a one-element fp32 CUDA tensor) as it is loaded. A tensor
    `grad_scale` that is not finite leaves every buffer untouched (fused_adam.py's note)."""
    n = param.numel()
    if n == 0:
        return
    cfg_block, cfg_warps = config_for(param.dtype)
    block, num_warps = block or cfg_block, num_warps or cfg_warps
    grid = (triton.cdiv(n, block),)
    tensor_scale = torch.is_tensor(grad_scale)
    _adam_flat_kernel[grid](param, grad, exp_avg, exp_avg_sq, out if out is not None else param, n,
                            grad_scale if tensor_scale else float(grad_scale),
                            *_scalars(lr, beta1, beta2, eps, weight_decay, bc1, bc2),
                            ADAMW=bool(adamw_mode), HAS_WD=weight_decay != 0, HAS_OUT=out is not None,
                            GSCALE_PTR=tensor_scale, BLOCK=block, num_warps=num_warps)


_block_tables = {}


def _block_table(sizes, device, block):
    key = (sizes, device, block)
    table = _block_tables.get(key)
    if table is None:
        tensor_idx, starts = [], []
        for i, n in enumerate(sizes):
            nb = (n + block - 1) // block
            tensor_idx.extend([i] * nb)
            starts.extend(range(0, nb * block, block))
        table = (torch.tensor(tensor_idx, dtype=torch.int32, device=device),
                 torch.tensor(starts, dtype=torch.int64, device=device),
                 torch.tensor(sizes, dtype=torch.int64, device=device))
        if len(_block_tables) > 64:
            _block_tables.clear()
        _block_tables[key] = table
    return table


def adam_multi(params, grads, exp_avgs, exp_avg_sqs, outs, *, lr, beta1, beta2, eps, weight_decay, bc1, bc2,
               adamw_mode, block=None, num_warps=None):
    """One step on lists of contiguous CUDA tensors in one launch ([Note: multi-tensor launch]).

    All params share one dtype, all grads one dtype, all states one dtype; `outs` is None or a list.
    """
    if not params:
        return
    cfg_block, cfg_warps = config_for(params[0].dtype)
    block, num_warps = block or cfg_block, num_warps or cfg_warps
    device = params[0].device
    sizes = tuple(p.numel() for p in params)
    blk_tensor, blk_start, sizes_t = _block_table(sizes, device, block)
    addrs = []
    for i, p in enumerate(params):
        addrs += [p.data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                  outs[i].data_ptr() if outs is not None else 0]
    addr_t = torch.tensor(addrs, dtype=torch.int64)
    if device.type == "cuda":  # pinned, so the copy is asynchronous; the caching host allocator keeps it alive
        addr_t = addr_t.pin_memory().to(device, non_blocking=True)
    if blk_tensor.numel() == 0:
        return
    _adam_multi_kernel[(blk_tensor.numel(),)](
        addr_t, sizes_t, blk_tensor, blk_start, *_scalars(lr, beta1, beta2, eps, weight_decay, bc1, bc2),
        P_T=_TL[params[0].dtype], G_T=_TL[grads[0].dtype], S_T=_TL[exp_avgs[0].dtype],
        O_T=_TL[outs[0].dtype] if outs is not None else tl.float32, ADAMW=bool(adamw_mode),
        HAS_WD=weight_decay != 0, HAS_OUT=outs is not None, BLOCK=block, num_warps=num_warps)
