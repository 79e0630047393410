"""DeepSpeed's `deepspeed.utils.groups` queries. dsrun has data parallelism only: the data-parallel group
is the world, and the model, sequence and expert parallel sizes are 1. Creating expert groups raises."""
import torch.distributed as dist

__all__ = ["get_data_parallel_group", "get_data_parallel_world_size", "get_data_parallel_rank",
           "get_model_parallel_world_size", "get_model_parallel_rank", "get_tensor_model_parallel_world_size",
           "get_tensor_model_parallel_rank", "get_sequence_parallel_world_size", "get_expert_parallel_world_size"]


def get_data_parallel_group():
    return dist.group.WORLD


def get_data_parallel_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def get_data_parallel_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_model_parallel_world_size() -> int:
    return 1


def get_model_parallel_rank() -> int:
    return 0


get_tensor_model_parallel_world_size = get_model_parallel_world_size
get_tensor_model_parallel_rank = get_model_parallel_rank


def get_sequence_parallel_world_size() -> int:
    return 1


def get_expert_parallel_world_size(group_name=None) -> int:
    return 1


def _create_expert_and_data_parallel(*args, **kwargs):
    raise NotImplementedError("expert parallelism (MoE) is not implemented by dsrun")


# DeepSpeed's private spellings, which its examples and Hugging Face call
_get_data_parallel_group = get_data_parallel_group
_get_data_parallel_world_size = get_data_parallel_world_size
_get_data_parallel_rank = get_data_parallel_rank
_get_model_parallel_world_size = get_model_parallel_world_size
_get_model_parallel_rank = get_model_parallel_rank
_get_sequence_parallel_world_size = get_sequence_parallel_world_size
_get_sequence_data_parallel_group = get_data_parallel_group
_get_sequence_data_parallel_world_size = get_data_parallel_world_size
_get_sequence_data_parallel_rank = get_data_parallel_rank
_get_expert_parallel_world_size = get_expert_parallel_world_size
_create_expert_data_and_model_parallel = _create_expert_and_data_parallel
