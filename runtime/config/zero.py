"""`zero_optimization` and its `offload_optimizer` / `offload_param` sections (reference section 1.8, 1.9).

Aliases and deprecations are resolved here, once, so that a `ZeroConfig` has one spelling per option:

- `stage3_*` keys and their un-prefixed forms are the same field (`stage3_prefetch_bucket_size` ==
  `prefetch_bucket_size`, ...); the un-prefixed name is the attribute.
- `stage3_gather_fp16_weights_on_model_save` (deprecated) -> `gather_16bit_weights_on_model_save`.
- `cpu_offload: true` -> `offload_optimizer: {device: cpu}`; `cpu_offload_param: true` ->
  `offload_param: {device: cpu}`; `cpu_offload_use_pin_memory` -> `pin_memory` of both. Giving a
  deprecated key together with its replacement is an error (DeepSpeed asserts).
- `zero_optimization: true/false` (deprecated) is rewritten to `{stage: 1}` / `{stage: 0}` by the
  top-level section.

`offload_param` below stage 3 is accepted with a warning and has no effect, as in DeepSpeed (only
stage 3 partitions parameters); `offload_param_device` then reads "none". ZeRO++ and MiCS keys are
accepted and ignored with a warning ([Note: inert keys] in schema.py).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional

from dsrun.errors import ConfigError

from .schema import ParseContext, Section, join, opt, warn_deprecated, warn_ignored
from .schema import non_negative as _non_negative

__all__ = ["ZeroConfig", "OffloadOptimizerConfig", "OffloadParamConfig"]

_DEVICES = ("none", "cpu", "nvme")


def _ratio(value: float, where: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"ratio must be between 0 and 1, got {value}", where=where)
    return value


def _positive(value, where: str):
    if value <= 0:
        raise ConfigError(f"must be > 0, got {value}", where=where)
    return value


@dataclass(frozen=True)
class OffloadOptimizerConfig(Section):
    device: str = opt("none", choices=_DEVICES)
    nvme_path: Optional[str] = opt(None)
    buffer_count: int = opt(4, check=_positive)
    pin_memory: bool = opt(True)
    pipeline_read: bool = opt(False)
    pipeline_write: bool = opt(False)
    fast_init: bool = opt(False)
    ratio: float = opt(1.0, check=_ratio)
    super_offload: bool = opt(False)
    cpuadam_cores_perc: float = opt(0.8, check=_ratio)

    @property
    def pipeline(self) -> bool:
        """DeepSpeed's derived flag: overlap NVMe reads or writes with compute."""
        return self.pipeline_read or self.pipeline_write

    @classmethod
    def _before(cls, data, where, ctx):
        data.pop("pipeline", None)  # derived in DeepSpeed; accepted in input, recomputed here
        return data

    def _check(self, where):
        if self.device == "nvme" and not self.nvme_path:
            raise ConfigError("device 'nvme' needs nvme_path", where=join(where, "nvme_path"),
                              hint="set nvme_path to a directory on a local NVMe drive")


@dataclass(frozen=True)
class OffloadParamConfig(Section):
    device: str = opt("none", choices=_DEVICES)
    nvme_path: Optional[str] = opt(None)
    buffer_count: int = opt(5, check=_positive)
    buffer_size: int = opt(100_000_000, check=_positive)
    max_in_cpu: int = opt(1_000_000_000, check=_non_negative)
    pin_memory: bool = opt(True)

    def _check(self, where):
        if self.device == "nvme" and not self.nvme_path:
            raise ConfigError("device 'nvme' needs nvme_path", where=join(where, "nvme_path"),
                              hint="set nvme_path to a directory on a local NVMe drive")


_DEPRECATED_OFFLOAD = {"cpu_offload": "offload_optimizer", "cpu_offload_param": "offload_param"}
_ZEROPP = "ZeRO++ / MiCS are not implemented by dsrun"


@dataclass(frozen=True)
class ZeroConfig(Section):
    stage: int = opt(0)
    contiguous_gradients: bool = opt(True)
    reduce_scatter: bool = opt(True)
    reduce_bucket_size: int = opt(500_000_000, check=_positive)
    use_multi_rank_bucket_allreduce: bool = opt(True)
    allgather_partitions: bool = opt(True)
    allgather_bucket_size: int = opt(500_000_000, check=_positive)
    overlap_comm: Optional[bool] = opt(None, doc="None -> true for stage 3, false otherwise (see .overlap)")
    overlap_param_gather: bool = opt(False, doc="dsrun: stages 1-2 gather updated weights under the next forward "
                                                "(runtime/zero/param_gather.py)")
    copy_engine_comm: bool = opt(True, doc="dsrun: on one node with NCCL, stages 1-2 move the weight all-gathers "
                                           "and the 16-bit gradient all-to-alls with copy engines over symmetric "
                                           "memory instead of NCCL kernels, where torch supports it "
                                           "(runtime/zero/copy_engine.py)")
    load_from_fp32_weights: bool = opt(True)
    elastic_checkpoint: bool = opt(False)
    offload_param: Optional[OffloadParamConfig] = opt(None)
    offload_optimizer: Optional[OffloadOptimizerConfig] = opt(None)
    sub_group_size: int = opt(1_000_000_000, check=_positive)
    prefetch_bucket_size: int = opt(50_000_000, aliases=("stage3_prefetch_bucket_size",), check=_non_negative)
    param_persistence_threshold: int = opt(100_000, aliases=("stage3_param_persistence_threshold",),
                                           check=_non_negative)
    model_persistence_threshold: int = opt(sys.maxsize, aliases=("stage3_model_persistence_threshold",),
                                           check=_non_negative)
    max_live_parameters: int = opt(1_000_000_000, aliases=("stage3_max_live_parameters",),
                                   check=_non_negative)
    max_reuse_distance: int = opt(1_000_000_000, aliases=("stage3_max_reuse_distance",), check=_non_negative)
    gather_16bit_weights_on_model_save: bool = opt(False, aliases=("stage3_gather_16bit_weights_on_model_save",))
    module_granularity_threshold: int = opt(0, aliases=("stage3_module_granularity_threshold",),
                                            check=_non_negative)
    use_all_reduce_for_fetch_params: bool = opt(False, aliases=("stage3_use_all_reduce_for_fetch_params",))
    allgather_sequential: bool = opt(False, aliases=("stage3_allgather_sequential",))
    ignore_unused_parameters: bool = opt(True)
    legacy_stage1: bool = opt(False)
    round_robin_gradients: bool = opt(False)
    zero_hpz_partition_size: int = opt(1, check=_positive, inert=_ZEROPP)
    zero_quantized_weights: bool = opt(False, inert=_ZEROPP)
    zero_quantized_nontrainable_weights: bool = opt(False, inert=_ZEROPP)
    zero_quantized_gradients: bool = opt(False, inert=_ZEROPP)
    zeropp_loco_param: Optional[Dict[str, Any]] = opt(None, inert=_ZEROPP)
    mics_shard_size: int = opt(-1, inert=_ZEROPP)
    mics_hierarchical_params_gather: bool = opt(False, inert=_ZEROPP)
    memory_efficient_linear: bool = opt(True)
    override_module_apply: bool = opt(True)
    pipeline_loading_checkpoint: bool = opt(False)
    log_trace_cache_warnings: bool = opt(False)
    enable_sanity_checks: bool = opt(False)
    save_muon_momentum_buffer_in_memory: bool = opt(False)
    leaf_module: Dict[str, Any] = opt(factory=dict)
    zenflow: Optional[Dict[str, Any]] = opt(None)

    _REMOVED = {
        "grad_hooks": "delete it: gradient hooks are always used",
        "cpu_offload_params": "use offload_param: {device: cpu}",
    }

    @property
    def overlap(self) -> bool:
        """`overlap_comm` with DeepSpeed's stage-dependent default applied."""
        return self.stage == 3 if self.overlap_comm is None else self.overlap_comm

    @property
    def offload_optimizer_device(self) -> str:
        return self.offload_optimizer.device if self.offload_optimizer else "none"

    @property
    def offload_param_device(self) -> str:
        """The parameter offload device; "none" below stage 3, where offload_param has no effect."""
        return self.offload_param.device if self.offload_param and self.stage == 3 else "none"

    @classmethod
    def _before(cls, data: Dict[str, Any], where: str, ctx: ParseContext) -> Dict[str, Any]:
        pin = data.pop("cpu_offload_use_pin_memory", None)
        for old, new in _DEPRECATED_OFFLOAD.items():
            if old not in data:
                continue
            value = data.pop(old)
            if not isinstance(value, bool):
                raise ConfigError(f"expected a boolean, got {value!r}", where=join(where, old))
            if new in data and data[new] is not None:
                raise ConfigError(f"'{old}' (deprecated) and '{new}' are both set; keep only '{new}'",
                                  where=join(where, old))
            warn_deprecated(f"{join(where, old)} is deprecated; use {new}: {{device: cpu}}")
            if value:
                data[new] = {"device": "cpu"} if pin is None else {"device": "cpu", "pin_memory": pin}
        if pin is not None:
            warn_deprecated(f"{join(where, 'cpu_offload_use_pin_memory')} is deprecated; use offload_*.pin_memory")
        old = "stage3_gather_fp16_weights_on_model_save"
        if old in data:
            if "gather_16bit_weights_on_model_save" in data or "stage3_gather_16bit_weights_on_model_save" in data:
                raise ConfigError(f"'{old}' (deprecated) and its replacement are both set; keep only "
                                  "'stage3_gather_16bit_weights_on_model_save'", where=join(where, old))
            warn_deprecated(f"{join(where, old)} is deprecated; use stage3_gather_16bit_weights_on_model_save")
            data["gather_16bit_weights_on_model_save"] = data.pop(old)
        return data

    def _check(self, where: str) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"stage must be 0, 1, 2 or 3, got {self.stage}", where=join(where, "stage"))
        if self.legacy_stage1:
            raise ConfigError("legacy_stage1 was removed from DeepSpeed and is not supported",
                              where=join(where, "legacy_stage1"), hint="delete the key")
        if self.offload_optimizer is not None and self.offload_optimizer.ratio < 1.0 and self.stage != 3:
            raise ConfigError(f"partial offloading (ratio {self.offload_optimizer.ratio}) needs stage 3, "
                              f"but stage is {self.stage}", where=join(where, "offload_optimizer.ratio"))
        if self.offload_param is not None and self.offload_param.device != "none" and self.stage != 3:
            warn_ignored(join(where, "offload_param"), f"parameters are only partitioned, and offloaded, at stage 3; "
                                                       f"stage is {self.stage}")
        if self.offload_optimizer_device != "none" and self.stage == 0:
            raise ConfigError("offload_optimizer needs ZeRO stage 1, 2 or 3, but stage is 0",
                              where=join(where, "offload_optimizer.device"), hint="set stage to 1, 2 or 3")

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out["overlap_comm"] = self.overlap
        return out

