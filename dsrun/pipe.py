"""`dsrun.pipe`: DeepSpeed's `deepspeed.pipe`. The implementation is dsrun.runtime.pipe; this name is that
same module object (sys.modules alias), so `dsrun.pipe.schedule` works too."""
import sys

from dsrun.runtime import pipe as _impl

sys.modules[__name__] = _impl
