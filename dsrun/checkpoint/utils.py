"""`clone_tensors_for_torch_save`: copy tensors (nested in lists, tuples, dicts) off their shared storage,
so that `torch.save` writes only their own elements (Hugging Face saves state dicts through it)."""
import torch

__all__ = ["clone_tensors_for_torch_save"]


def clone_tensors_for_torch_save(item, device=torch.device("cpu")):
    """A copy of `item` with every tensor cloned (or moved) to `device`; other values are returned as is."""
    if torch.is_tensor(item):
        device = torch.device(device) if isinstance(device, str) else device
        return item.detach().clone() if item.device == device else item.detach().to(device)
    if isinstance(item, list):
        return [clone_tensors_for_torch_save(v, device) for v in item]
    if isinstance(item, tuple):
        return tuple(clone_tensors_for_torch_save(v, device) for v in item)
    if isinstance(item, dict):
        return type(item)({k: clone_tensors_for_torch_save(v, device) for k, v in item.items()})
    return item
