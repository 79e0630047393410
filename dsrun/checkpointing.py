"""`dsrun.checkpointing`: DeepSpeed's `deepspeed.checkpointing`. The implementation is
dsrun.runtime.checkpointing; this name is that same module object (so `configure` here and there is one
state), hence the sys.modules alias rather than a re-export."""
import sys

from dsrun.runtime import checkpointing as _impl

sys.modules[__name__] = _impl
