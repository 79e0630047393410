"""`dsrun.ops.lion`: DeepSpeed's Lion optimizers. dsrun has no Lion kernel: the names import, and
constructing one raises `NotImplementedError` (use torch's optimizers or Adam/AdamW)."""

__all__ = ["FusedLion", "DeepSpeedCPULion"]


class _NotImplementedOptimizer:
    _feature = ""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"{self._feature} is not implemented by dsrun (no Lion kernel); use Adam/AdamW "
                                  "or a torch.optim optimizer")


class FusedLion(_NotImplementedOptimizer):
    _feature = "deepspeed.ops.lion.FusedLion"


class DeepSpeedCPULion(_NotImplementedOptimizer):
    _feature = "deepspeed.ops.lion.DeepSpeedCPULion"
