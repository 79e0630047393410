"""FusedAdam: the GPU Adam/AdamW optimizer, one Triton launch per group of like tensors.

Drop-in for DeepSpeed's `FusedAdam` (same keywords: `adam_w_mode`, `bias_correction`, ...) and for
`torch.optim.AdamW(fused=True)` (same param groups and state_dict keys 'step', 'exp_avg',
'exp_avg_sq'; states have the param's dtype, as in both). `step_flat` updates caller-owned flat
buffers (ZeRO partitions), including the mixed-precision form: fp32 master param and states, 16-bit
grad in, 16-bit param copy out, one pass (28 B/param).

Backends, picked per call: the Triton kernels of `triton_adam.py` for CUDA tensors; without Triton,
torch's own `_fused_adam(w)_`; for CPU tensors (tests, no GPU) the pure PyTorch reference.
"""
import math
import warnings
from collections import defaultdict

import torch

from . import reference

__all__ = ["FusedAdam", "fused_adam_flat", "fused_adam_multi", "triton_available"]

_triton = None
_triton_error = None
_warned = False


def triton_available():
    """True when the Triton kernels import (Triton installed); the import is attempted once."""
    global _triton, _triton_error
    if _triton is None and _triton_error is None:
        try:
            from . import triton_adam
            _triton = triton_adam
        except Exception as e:  # ImportError, or a Triton that fails to initialise
            _triton_error = f"{type(e).__name__}: {e}"
    return _triton is not None


def _warn_no_triton():
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"dsrun: Triton unavailable ({_triton_error}); FusedAdam uses torch's fused Adam kernels",
                      RuntimeWarning, stacklevel=4)


FLAT_PER_TENSOR_MIN_NUMEL = 1 << 20


def fused_adam_multi(params, grads, exp_avgs, exp_avg_sqs, outs=None, *, lr, beta1, beta2, eps, weight_decay,
                     step, adamw_mode=True, bias_correction=True):
    """One step on lists of same-device contiguous tensors with one dtype per role, in place."""
    if not params:
        return
    bc1, bc2 = reference.bias_corrections(beta1, beta2, step, bias_correction)
    if params[0].is_cuda and triton_available():
        # [Note: flat vs multi-tensor] One launch per tensor through the flat kernel wins once tensors are
        # large enough to hide the launch (~5 us): it needs no address table (a ZeRO flat partition is the
        # one-tensor case). Many small tensors go through the multi-tensor kernel in one launch.
        # Measured on an H200 (RESULTS.md B2, 2026-11-22): for 128 tensors of 8Mi elements, one multi-tensor
        # launch with 2-16 blocks per program was 27-90% slower than one flat launch per tensor.
        if len(params) == 1 or min(p.numel() for p in params) >= FLAT_PER_TENSOR_MIN_NUMEL:
            for i, p in enumerate(params):
                _triton.adam_flat(p, grads[i], exp_avgs[i], exp_avg_sqs[i], None if outs is None else outs[i],
                                  lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, bc1=bc1,
                                  bc2=bc2, adamw_mode=adamw_mode)
            return
        return _triton.adam_multi(params, grads, exp_avgs, exp_avg_sqs, outs, lr=lr, beta1=beta1, beta2=beta2,
                                  eps=eps, weight_decay=weight_decay, bc1=bc1, bc2=bc2, adamw_mode=adamw_mode)
    same = params[0].dtype == grads[0].dtype == exp_avgs[0].dtype
    if params[0].is_cuda and same and bias_correction and outs is None:
        _warn_no_triton()
        fn = torch._fused_adamw_ if adamw_mode else torch._fused_adam_
        steps = [torch.tensor(float(step), device=params[0].device) for _ in params]
        fn(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
           weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
        return
    for i, p in enumerate(params):
        reference.adam_step(p, grads[i], exp_avgs[i], exp_avg_sqs[i], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, step=step, adamw_mode=adamw_mode,
                            bias_correction=bias_correction, out=None if outs is None else outs[i])


def fused_adam_flat(param, grad, exp_avg, exp_avg_sq, out=None, *, lr, beta1, beta2, eps, weight_decay, step,
                    adamw_mode=True, bias_correction=True, grad_scale=1.0):
    """One step on same-length contiguous tensors (a ZeRO partition), in place; see module doc.

    `grad_scale` (a float or a one-element fp32 tensor on the param's device) multiplies the gradient
    inside the kernel (ZeRO's unscale-and-clip coefficient), so `grad` itself is left as it was.

    [Note: non-finite grad_scale skips] A NaN or infinite `grad_scale` means "skip this step": param,
    states and `out` stay as they were. ZeRO passes NaN when the global gradient norm overflowed, so an
    overflow skips the update without the host ever reading the norm (runtime/zero/optimizer.py's
    [Note: device-side skip]); the Triton kernel tests it per program, the fallbacks on the host."""
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("out", out)):
        if t is not None and (t.numel() != param.numel() or not t.is_contiguous() or t.device != param.device):
            raise ValueError(f"fused_adam_flat: {name} must be contiguous, on {param.device}, "
                             f"with {param.numel()} elements")
    if not param.is_contiguous():
        raise ValueError("fused_adam_flat: param must be contiguous")
    tensor_scale = torch.is_tensor(grad_scale)
    if param.is_cuda and triton_available():
        if not tensor_scale and not math.isfinite(grad_scale):
            return
        bc1, bc2 = reference.bias_corrections(beta1, beta2, step, bias_correction)
        return _triton.adam_flat(param, grad, exp_avg, exp_avg_sq, out, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                 weight_decay=weight_decay, bc1=bc1, bc2=bc2, adamw_mode=adamw_mode,
                                 grad_scale=grad_scale)
    if not math.isfinite(float(grad_scale)):  # reads a device scalar: the fallbacks are not sync-free
        return
    if tensor_scale or grad_scale != 1.0:
        grad = grad.float() * grad_scale
    fused_adam_multi([param], [grad], [exp_avg], [exp_avg_sq], None if out is None else [out], lr=lr,
                     beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                     adamw_mode=adamw_mode, bias_correction=bias_correction)


class FusedAdam(torch.optim.Optimizer):
    """Adam/AdamW for GPU params (fp32, bf16 or fp16; states in the param's dtype).

    Args: params, lr, bias_correction, betas, eps, adam_w_mode (True: AdamW's decoupled decay),
    weight_decay, amsgrad (must be False), set_grad_none (zero_grad sets grads to None).
    """

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, amsgrad=False, set_grad_none=True):
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, adam_w_mode=adam_w_mode)
        super().__init__(params, defaults)
        self.adam_w_mode = adam_w_mode
        self.set_grad_none = set_grad_none

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("bias_correction", True)
            group.setdefault("adam_w_mode", True)

    def zero_grad(self, set_to_none=None):
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else set_to_none)

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    adamw_mode=group["adam_w_mode"], bias_correction=group["bias_correction"])

    @torch.no_grad()
    def step(self, closure=None):
        """One step over every param with a grad: one launch per (device, dtypes, step) bucket."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets = defaultdict(lambda: ([], [], [], []))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdam does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["step"] = int(state["step"]) + 1
                if not p.is_contiguous():
                    raise ValueError("FusedAdam: params must be contiguous")
                key = (p.device, p.dtype, p.grad.dtype, state["exp_avg"].dtype, state["step"])
                b = buckets[key]
                b[0].append(p)
                b[1].append(p.grad.contiguous())
                b[2].append(state["exp_avg"])
                b[3].append(state["exp_avg_sq"])
            hyper = self._hyper(group)
            for key, (ps, gs, ms, vs) in buckets.items():
                fused_adam_multi(ps, gs, ms, vs, None, step=key[-1], **hyper)
        return loss

    @torch.no_grad()
    def step_flat(self, param, grad, exp_avg, exp_avg_sq, step, *, out=None, group=0, **overrides):
        """One step on caller-owned flat buffers with param group `group`'s hyperparameters.

        param: fp32 master or 16-bit, updated in place; grad: any float dtype; exp_avg, exp_avg_sq:
        states (fp32 for a mixed-precision master); step: 1-based step number after this update;
        out: optional buffer receiving the updated param (e.g. the bf16 model weights).
        """
        hyper = self._hyper(self.param_groups[group])
        hyper.update(overrides)
        fused_adam_flat(param, grad, exp_avg, exp_avg_sq, out, step=step, **hyper)
