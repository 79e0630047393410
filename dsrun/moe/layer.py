"""`MoE`: DeepSpeed's mixture-of-experts layer. Not implemented by dsrun: constructing one raises."""
import torch

__all__ = ["MoE"]


class MoE(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("deepspeed.moe.layer.MoE (mixture of experts) is not implemented by dsrun")
