"""`dsrun.ops.op_builder`: DeepSpeed's op builders, answering for dsrun's kernels.

DeepSpeed scripts and tests ask a builder whether its op runs here (`is_compatible()`, or
`deepspeed.ops.__compatible_ops__[Builder.NAME]`) and sometimes `load()` it. dsrun's ops are
`cpu_adam`/`cpu_adagrad` (C++ SIMD, with a PyTorch fallback: dsrun.kernels.loader), `fused_adam`
(Triton on GPU, PyTorch fallback) and `fused_lamb` (PyTorch): always usable. Every other DeepSpeed op
has a builder that says it is not compatible and whose `load()` raises `NotImplementedError`.
"""
from __future__ import annotations

import importlib
from typing import Dict

__all__ = ["OpBuilder", "ALL_OPS", "compatible_ops", "get_default_compute_capabilities"]


class OpBuilder:
    """One op: `NAME`, `is_compatible()`, `load()` (the module implementing it), `absolute_name()`."""

    NAME = ""
    _module = ""  # dsrun module implementing the op; "" = not implemented

    def __init__(self, name: str = None):
        self.name = name or self.NAME

    def absolute_name(self) -> str:
        return f"dsrun.ops.{self.NAME}_op"

    def is_compatible(self, verbose: bool = False) -> bool:
        return bool(self._module)

    def load(self, verbose: bool = True):
        if not self._module:
            raise NotImplementedError(f"the DeepSpeed op '{self.NAME}' ({type(self).__name__}) is not implemented "
                                      "by dsrun")
        module = importlib.import_module(self._module)
        if self.NAME in ("cpu_adam", "cpu_adagrad"):
            from dsrun.kernels.loader import load_cpu_ops
            load_cpu_ops()  # builds or finds the library now, as DeepSpeed's load() does
        return module

    def builder(self):
        raise NotImplementedError("dsrun builds its kernels itself (pip install, or JIT on first use)")


def _builder(class_name: str, op_name: str, module: str = "") -> type:
    return type(class_name, (OpBuilder,), {"NAME": op_name, "_module": module, "__module__": __name__})


_IMPLEMENTED = {
    "CPUAdamBuilder": ("cpu_adam", "dsrun.kernels.cpu_ops"),
    "CPUAdagradBuilder": ("cpu_adagrad", "dsrun.kernels.cpu_ops"),
    "FusedAdamBuilder": ("fused_adam", "dsrun.kernels.fused_adam"),
    "FusedLambBuilder": ("fused_lamb", "dsrun.runtime.lamb"),
}
_NOT_IMPLEMENTED = {
    "CPULionBuilder": "cpu_lion", "FusedLionBuilder": "fused_lion", "AsyncIOBuilder": "async_io",
    "GDSBuilder": "gds", "TransformerBuilder": "transformer", "StochasticTransformerBuilder": "stochastic_transformer",
    "InferenceBuilder": "transformer_inference", "QuantizerBuilder": "quantizer", "FPQuantizerBuilder": "fp_quantizer",
    "SparseAttnBuilder": "sparse_attn", "RandomLTDBuilder": "random_ltd", "EvoformerAttnBuilder": "evoformer_attn",
    "SpatialInferenceBuilder": "spatial_inference", "RaggedOpsBuilder": "ragged_device_ops",
    "RaggedUtilsBuilder": "ragged_ops", "InferenceCoreBuilder": "inference_core_ops",
    "CUTLASSOpsBuilder": "cutlass_ops", "DeepCompileBuilder": "dc", "CCLCommBuilder": "deepspeed_ccl_comm",
    "ShareMemCommBuilder": "deepspeed_shm_comm", "NotImplementedBuilder": "deepspeed_not_implemented",
}

ALL_OPS: Dict[str, OpBuilder] = {}
for _cls, (_op, _mod) in _IMPLEMENTED.items():
    globals()[_cls] = _builder(_cls, _op, _mod)
    ALL_OPS[_op] = globals()[_cls]()
for _cls, _op in _NOT_IMPLEMENTED.items():
    globals()[_cls] = _builder(_cls, _op)
    ALL_OPS[_op] = globals()[_cls]()
__all__ += list(_IMPLEMENTED) + list(_NOT_IMPLEMENTED)

compatible_ops: Dict[str, bool] = {name: builder.is_compatible() for name, builder in ALL_OPS.items()}


def get_default_compute_capabilities() -> str:
    return "8.0;9.0"
