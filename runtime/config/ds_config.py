"""`DsConfig`, the resolved config every rank holds, and `load_config`, the one way to build it.

Pipeline: read the source (loader.py) -> resolve "auto" (auto.py) -> parse strictly into typed
sections (toplevel.py and friends) -> infer and check the batch triple (batch.py) -> resolve the
policies (resolve.py). `DsConfig` is frozen; `raw` is the canonical resolved dict (aliases folded,
defaults filled, "auto" replaced) and `fingerprint()` its sha256, which the engine all-gathers to
check that every rank resolved the same config (`diff_keys` names the top-level keys that differ).

Top-level keys without a dedicated attribute (e.g. `memory_breakdown`, `elasticity`) are reachable as
attributes too (`cfg.memory_breakdown`), from the parsed top-level section.

DeepSpeed's `engine.config` is the user's config dict, and Hugging Face code reads it as one
(`engine.config.get("zero_optimization", {})`, `engine.config["fp16"]["enabled"]`). `DsConfig` reads
the same way, read-only, over `raw`: `get`, `[]`, `in`, `keys`, `items`, iteration; values are the
plain resolved dicts and scalars.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from dsrun.errors import ConfigError

from .auto import resolve_auto
from .batch import resolve_batch
from .loader import locate_key, read_source
from .optim import OptimizerConfig, SchedulerConfig
from .policies import CommPolicy, OffloadPolicy, PrecisionPolicy, ShardingPolicy
from .precision import BF16Config, DataTypesConfig, FP16Config
from .resolve import comm_policy, offload_policy, precision_policy, sharding_policy
from .schema import ParseContext, parse_section
from .sections import (ActivationCheckpointingConfig, CheckpointConfig, CometConfig, CSVMonitorConfig,
                       PipelineConfig, TensorBoardConfig, WandbConfig)
from .toplevel import TopLevelConfig
from .zero import ZeroConfig

__all__ = ["DsConfig", "load_config", "diff_keys"]


@dataclass(frozen=True)
class DsConfig:
    """A validated, fully resolved DeepSpeed config (see the module docstring)."""

    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int
    world_size: int  # the data-parallel size the batch triple was resolved for
    gradient_clipping: float  # 0.0 = off; DeepSpeed's default 1.0 when absent
    optimizer: Optional[OptimizerConfig]
    scheduler: Optional[SchedulerConfig]
    zero: ZeroConfig
    sharding: ShardingPolicy
    offload: OffloadPolicy
    precision: PrecisionPolicy
    comm: CommPolicy
    fp16: FP16Config
    bf16: BF16Config
    data_types: DataTypesConfig
    checkpoint: CheckpointConfig
    activation_checkpointing: ActivationCheckpointingConfig
    pipeline: PipelineConfig
    tensorboard: TensorBoardConfig
    csv_monitor: CSVMonitorConfig
    wandb: WandbConfig
    comet: CometConfig
    steps_per_print: int  # 0 = never (DeepSpeed's code default None)
    wall_clock_breakdown: bool
    dump_state: bool
    zero_allow_untested_optimizer: bool
    communication_data_type: Optional[str]
    raw: Dict[str, Any] = field(repr=False)
    auto_resolved: Dict[str, str] = field(repr=False)  # path -> "value (source)" for each "auto"
    top: TopLevelConfig = field(repr=False)  # every top-level key, parsed
    source: str = field(default="<dict>", repr=False)  # file path, "<dict>" or "<base64>"
    raw_input: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # as read, before "auto"

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: expose the remaining top-level keys
        if name != "top" and "top" in self.__dict__ and name in self.__dict__["top"]:
            return getattr(self.__dict__["top"], name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    # -- read-only mapping view over `raw` (see the module docstring) -------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def __contains__(self, key: object) -> bool:
        return key in self.raw

    def __iter__(self):
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def keys(self):
        return self.raw.keys()

    def items(self):
        return self.raw.items()

    def values(self):
        return self.raw.values()

    @property
    def zero_optimization(self) -> ZeroConfig:
        return self.zero

    @property
    def zero_optimization_stage(self) -> int:
        return self.zero.stage

    @property
    def zero_enabled(self) -> bool:
        return self.sharding.any

    @property
    def fp16_enabled(self) -> bool:
        return self.fp16.enabled

    @property
    def bfloat16_enabled(self) -> bool:
        return self.bf16.enabled

    @property
    def monitors_enabled(self) -> bool:
        return any(m.enabled for m in (self.tensorboard, self.csv_monitor, self.wandb, self.comet))

    def fingerprint(self) -> str:
        """sha256 of the canonical resolved dict; equal on every rank that resolved the same config."""
        return fingerprint_dict(self.raw)

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(canonical_json(self.raw))


def canonical_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)


def fingerprint_dict(data: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()


def diff_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> List[str]:
    """Sorted top-level keys whose values differ between two resolved dicts (missing counts as differing)."""
    return sorted(k for k in set(a) | set(b)
                  if k not in a or k not in b or canonical_json({"v": a[k]}) != canonical_json({"v": b[k]}))


def load_config(source: Any, *, world_size: int = 1, auto: Optional[Mapping[str, Any]] = None) -> DsConfig:
    """Load, validate and resolve a DeepSpeed config.

    Args:
        source: a dict, a path to a JSON/YAML file, a url-safe base64 JSON string, or a DsConfig
            (returned as is when `world_size` matches and no `auto` is given; otherwise re-resolved
            from its `raw_input`).
        world_size: the data-parallel size used in the batch-triple math.
        auto: values for "auto" keys (auto.py lists the rules).

    Raises:
        ConfigError: naming the key path of the first problem found; for a file source, `where` is
            "<file>:<line>: <key path>" and the bare key path is in the error's `key_path` attribute.
    """
    if isinstance(source, DsConfig):
        if source.world_size == world_size and not auto:
            return source
        return load_config(source.raw_input, world_size=world_size, auto=auto)
    data, where = read_source(source)
    try:
        return _resolve(data, where, world_size, auto)
    except ConfigError as exc:
        if where.startswith("<") or not exc.where or exc.where == "world_size":
            raise
        line = locate_key(where, exc.where)
        located = ConfigError(exc.message, where=f"{where}:{line}: {exc.where}" if line else f"{where}: {exc.where}",
                              hint=exc.hint)
        located.key_path = exc.where
        raise located from None


def _resolve(data: Dict[str, Any], where: str, world_size: int, auto: Optional[Mapping[str, Any]]) -> DsConfig:
    resolved_data, notes = resolve_auto(data, auto)
    ctx = ParseContext(auto=dict(auto or {}))
    top = parse_section(TopLevelConfig, resolved_data, "", ctx)
    notes.update(ctx.notes)
    batch = resolve_batch(top.train_batch_size, top.train_micro_batch_size_per_gpu, top.gradient_accumulation_steps,
                          world_size)
    raw = _canonical(top, batch, data)
    cfg = DsConfig(
        train_batch_size=batch.train_batch_size,
        train_micro_batch_size_per_gpu=batch.train_micro_batch_size_per_gpu,
        gradient_accumulation_steps=batch.gradient_accumulation_steps,
        world_size=world_size,
        gradient_clipping=top.gradient_clipping,
        optimizer=top.optimizer,
        scheduler=top.scheduler,
        zero=top.zero_optimization,
        sharding=sharding_policy(top),
        offload=offload_policy(top),
        precision=precision_policy(top),
        comm=comm_policy(top),
        fp16=top.fp16,
        bf16=top.bf16,
        data_types=top.data_types,
        checkpoint=top.checkpoint,
        activation_checkpointing=top.activation_checkpointing,
        pipeline=top.pipeline,
        tensorboard=top.tensorboard,
        csv_monitor=top.csv_monitor,
        wandb=top.wandb,
        comet=top.comet,
        steps_per_print=top.steps_per_print or 0,
        wall_clock_breakdown=top.wall_clock_breakdown,
        dump_state=top.dump_state,
        zero_allow_untested_optimizer=top.zero_allow_untested_optimizer,
        communication_data_type=top.communication_data_type,
        raw=raw,
        auto_resolved=notes,
        top=top,
        source=where,
        raw_input=data,
    )
    return cfg


def _canonical(top: TopLevelConfig, batch, given: Mapping[str, Any]) -> Dict[str, Any]:
    """The resolved dict: every typed key with its value, passthrough keys as given (None dropped)."""
    raw = top.to_dict()
    raw.update(batch._asdict())
    for key in list(raw):
        if raw[key] is None and key not in given:
            del raw[key]
    _check_finite(raw, "")
    return raw


def _check_finite(node: Any, where: str) -> None:
    # nan != nan would make fingerprints of equal configs differ in meaning; reject it up front.
    if isinstance(node, float) and math.isnan(node):
        raise ConfigError("NaN is not a valid config value", where=where)
    if isinstance(node, dict):
        for k, v in node.items():
            _check_finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_finite(v, f"{where}[{i}]")

