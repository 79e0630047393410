"""Memory needed for model states per GPU and per host, for each ZeRO stage and offload choice.

[Note: estimate formulas] dsrun's own rows follow the ZeRO paper (Rajbhandari et al. 2019, section 3;
shared/reference/performance-anchors.md 2.4): mixed-precision Adam holds 2 bytes per parameter of
16-bit weights, 2 of 16-bit gradients and K = 12 of fp32 master weights, momentum and variance
(16 bytes per parameter). Over N data-parallel GPUs, stage 1 shards the optimizer term, stage 2 also
the gradients, stage 3 also the weights:

    stage 0: 16 Psi   stage 1: 4 Psi + 12 Psi / N   stage 2: 2 Psi + 14 Psi / N   stage 3: 16 Psi / N

Offload moves terms to host memory (ZeRO-Offload / ZeRO-Infinity): `offload_optimizer` moves this GPU's
optimizer shard and, from stage 2 on, its gradient shard (the CPU optimizer consumes them there);
`offload_param` (stage 3) moves its weight shard. Host bytes are per node: the offloaded bytes of its
GPUs added up. Activations, communication buckets and fragmentation are extra.

DeepSpeed's estimators (`estimate_zero2_model_states_mem_needs*`, `estimate_zero3_*`) keep DeepSpeed's
own formulas (fp32 gradients, `additional_buffer_factor`; shared/reference/deepspeed-runtime.md 3.8),
print DeepSpeed's table and return nothing; `..._mem_needs` (without a suffix) return the numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Tuple

__all__ = ["EstimateRow", "model_state_bytes", "estimate_rows", "model_to_params",
           "estimate_zero2_model_states_mem_needs", "estimate_zero2_model_states_mem_needs_all_live",
           "estimate_zero2_model_states_mem_needs_all_cold", "estimate_zero3_model_states_mem_needs",
           "estimate_zero3_model_states_mem_needs_all_live", "estimate_zero3_model_states_mem_needs_all_cold"]

WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = 2, 2, 12  # per parameter (K = 12)

# (stage, offload_optimizer, offload_param): every combination ZeRO allows
CHOICES = ((0, False, False), (1, False, False), (1, True, False), (2, False, False), (2, True, False),
           (3, False, False), (3, True, False), (3, True, True))


@dataclass(frozen=True)
class EstimateRow:
    stage: int
    offload_optimizer: bool
    offload_param: bool
    gpu_bytes: int  # per GPU
    cpu_bytes: int  # per node

    def to_dict(self):
        return asdict(self)


def model_state_bytes(params: float, *, stage: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                      offload_optimizer: bool = False, offload_param: bool = False) -> Tuple[int, int]:
    """(bytes per GPU, bytes per node of host memory) for `params` parameters ([Note: estimate formulas])."""
    from .config.policies import ShardingPolicy
    sharded = ShardingPolicy.from_stage(stage)  # the stage is the row's label; the policy says what is split
    n = num_gpus_per_node * num_nodes
    weights = WEIGHT_BYTES * params / (n if sharded.parameters else 1)
    grads = GRAD_BYTES * params / (n if sharded.gradients else 1)
    optim = OPTIMIZER_BYTES * params / (n if sharded.optimizer_state else 1)
    host = 0.0
    if offload_optimizer:
        host += optim
        optim = 0.0
        if sharded.gradients:
            host, grads = host + grads, 0.0
    if offload_param:
        host, weights = host + weights, 0.0
    return int(round(weights + grads + optim)), int(round(host * num_gpus_per_node))


def estimate_rows(params: float, *, num_gpus_per_node: int = 1, num_nodes: int = 1) -> List[EstimateRow]:
    """One row per (stage, offload_optimizer, offload_param) combination ZeRO allows."""
    rows = []
    for stage, off_opt, off_param in CHOICES:
        gpu, cpu = model_state_bytes(params, stage=stage, num_gpus_per_node=num_gpus_per_node, num_nodes=num_nodes,
                                     offload_optimizer=off_opt, offload_param=off_param)
        rows.append(EstimateRow(stage, off_opt, off_param, gpu, cpu))
    return rows


# -- DeepSpeed's estimators (same names, arguments and formulas) ---------------------------------------

def model_to_params(model) -> Tuple[int, int]:
    """(total parameters, counting shared ones once; largest parameter count owned by one module)."""
    total = sum({p.data_ptr() if p.device.type != "meta" else id(p): p.numel() for p in model.parameters()}.values())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


def estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node=1, num_nodes=1, cpu_offload=True,
                                          additional_buffer_factor=1.5):
    """DeepSpeed's ZeRO-2 formula: returns (cpu_bytes, gpu_bytes)."""
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu_mem = 2 * total_params
        cpu_mem = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        # 2 = 16-bit params; 18 = 16-bit grads 2 + fp32 grads 4 + fp32 params 4 + optimizer states 8
        gpu_mem = 2 * total_params + int(18 * total_params / total_gpus)
        cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def estimate_zero3_model_states_mem_needs(total_params, largest_layer_params, num_gpus_per_node=1, num_nodes=1,
                                          cpu_offload=True, cpu_offload_params=True, zero_init=True,
                                          additional_buffer_factor=1.5):
    """DeepSpeed's ZeRO-3 formula: returns (cpu_bytes, gpu_bytes, largest_layer_memory)."""
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            gpu_mem = largest_layer_memory
            per_param = 18 * gpus_factor
        else:
            gpu_mem = largest_layer_memory + int(2 * total_params / total_gpus)
            per_param = 16 * gpus_factor
        cpu_mem = total_params * (per_param if zero_init else max(4 * num_gpus_per_node, per_param)) \
            * additional_buffer_factor
    else:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        cpu_mem = (largest_layer_params if zero_init else total_params) * 4 * num_gpus_per_node \
            * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem), largest_layer_memory


def _header(num_gpus_per_node, num_nodes, sw):
    nodes = "nodes" if num_nodes > 1 else "node"
    gpus = "GPUs" if num_gpus_per_node > 1 else "GPU"
    print("Estimated memory needed for params, optim states and gradients for a:\n"
          f"HW: Setup with {num_nodes} {nodes}, {num_gpus_per_node} {gpus} per node.\n"
          f"SW: {sw}")
    print("  per CPU  |  per GPU |   Options")


def estimate_zero2_model_states_mem_needs_all_cold(total_params, num_gpus_per_node=1, num_nodes=1,
                                                   additional_buffer_factor=1.5):
    """Print DeepSpeed's ZeRO-2 table for a hypothetical model of `total_params` parameters."""
    _header(num_gpus_per_node, num_nodes, f"Model with {int(total_params / 1e6)}M total params.")
    for cpu_offload in (True, False):
        cpu, gpu = estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node, num_nodes, cpu_offload,
                                                         additional_buffer_factor)
        device = "cpu " if cpu_offload else "none"
        print(f" {cpu / 2**30:7.2f}GB | {gpu / 2**30:6.2f}GB | offload_optimizer={device}")


def estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=1, num_nodes=1,
                                                   additional_buffer_factor=1.5):
    """Print DeepSpeed's ZeRO-2 table for `model` (shared parameters counted once)."""
    total, _ = model_to_params(model)
    estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node, num_nodes, additional_buffer_factor)


def estimate_zero3_model_states_mem_needs_all_cold(total_params, largest_layer_params, num_gpus_per_node=1,
                                                   num_nodes=1, additional_buffer_factor=1.5):
    """Print DeepSpeed's ZeRO-3 table for a hypothetical model."""
    _header(num_gpus_per_node, num_nodes, f"Model with {int(total_params / 1e6)}M total params, "
                                          f"{int(largest_layer_params / 1e6)}M largest layer params.")
    for cpu_offload in (True, False):
        for offload_params in (True, False):
            if offload_params and not cpu_offload:
                continue
            for zero_init in (True, False):
                cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                    total_params, largest_layer_params, num_gpus_per_node, num_nodes, cpu_offload, offload_params,
                    zero_init, additional_buffer_factor)
                options = (f"offload_param={'cpu ' if offload_params else 'none'}, "
                           f"offload_optimizer={'cpu ' if cpu_offload else 'none'}, zero_init={int(zero_init)}")
                print(f" {cpu / 2**30:7.2f}GB | {gpu / 2**30:6.2f}GB | {options}")


def estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=1, num_nodes=1,
                                                   additional_buffer_factor=1.5):
    """Print DeepSpeed's ZeRO-3 table for `model`."""
    total, largest = model_to_params(model)
    estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node, num_nodes,
                                                   additional_buffer_factor)
