"""`dsrun.comm`: DeepSpeed's `deepspeed.comm`, thin over `torch.distributed`.

    import dsrun.comm as dist
    dist.init_distributed(); dist.all_reduce(t); dist.get_rank()

The functions take DeepSpeed's signatures (extra `prof`, `log_name`, `debug` keywords are accepted and
ignored: dsrun has no comms logger) and call torch.distributed on the default or given group.
"""
from .comm import *  # noqa: F401,F403
from .comm import __all__  # noqa: F401
