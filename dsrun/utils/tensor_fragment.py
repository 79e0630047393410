"""DeepSpeed's tensor-fragment accessors (`safe_get_full_grad`, `safe_set_local_fp32_param`, ...).

dsrun keeps an engine's gradients, fp32 master weights and optimizer state in the sharding layer's
flat buffers, not on the parameters, and has no accessor for them yet. Reading a gradient works where
the gradient is on the parameter (`param.grad` set: a parameter no engine manages); everything else
raises `NotImplementedError` naming the function, rather than returning a wrong value.
"""
__all__ = ["safe_get_full_grad", "safe_get_local_grad", "safe_set_full_grad", "safe_set_local_grad",
           "safe_get_full_fp32_param", "safe_get_local_fp32_param", "safe_set_full_fp32_param",
           "safe_set_local_fp32_param", "safe_get_full_optimizer_state", "safe_get_local_optimizer_state",
           "safe_set_full_optimizer_state", "safe_set_local_optimizer_state"]


def _unsupported(name: str):
    def fn(*args, **kwargs):
        raise NotImplementedError(f"deepspeed.utils.{name}: dsrun keeps gradients, fp32 master weights and "
                                  "optimizer state in the engine's flat buffers and has no tensor-fragment "
                                  "accessor for them yet")
    fn.__name__ = fn.__qualname__ = name
    return fn


def _grad_reader(name: str):
    unsupported = _unsupported(name)

    def fn(param):
        if param.grad is None:
            unsupported()
        return param.grad
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = "`param.grad` when the parameter holds its gradient; NotImplementedError otherwise."
    return fn


safe_get_full_grad = _grad_reader("safe_get_full_grad")
safe_get_local_grad = _grad_reader("safe_get_local_grad")
safe_set_full_grad = _unsupported("safe_set_full_grad")
safe_set_local_grad = _unsupported("safe_set_local_grad")
safe_get_full_fp32_param = _unsupported("safe_get_full_fp32_param")
safe_get_local_fp32_param = _unsupported("safe_get_local_fp32_param")
safe_set_full_fp32_param = _unsupported("safe_set_full_fp32_param")
safe_set_local_fp32_param = _unsupported("safe_set_local_fp32_param")
safe_get_full_optimizer_state = _unsupported("safe_get_full_optimizer_state")
safe_get_local_optimizer_state = _unsupported("safe_get_local_optimizer_state")
safe_set_full_optimizer_state = _unsupported("safe_set_full_optimizer_state")
safe_set_local_optimizer_state = _unsupported("safe_set_local_optimizer_state")
