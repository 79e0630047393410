"""`LayerSpec` and `TiedLayerSpec` (DeepSpeed's `deepspeed.pipe` layer descriptions) and the
`PipelineModule` name. The pipeline engine is not built yet: constructing a PipelineModule raises
NotImplementedError naming the feature (importing it does not), so scripts that only import it still run.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Union

import torch

__all__ = ["LayerSpec", "TiedLayerSpec", "PipelineModule"]


class LayerSpec:
    """A layer to build later, on the stage that owns it: `typename(*module_args, **module_kwargs)`.

    Raises:
        RuntimeError: `typename` is not a torch.nn.Module subclass (DeepSpeed's check and message).
    """

    def __init__(self, typename: type, *module_args: Any, **module_kwargs: Any):
        if not (isinstance(typename, type) and issubclass(typename, torch.nn.Module)):
            raise RuntimeError("LayerSpec only supports torch.nn.Module types.")
        self.typename, self.module_args, self.module_kwargs = typename, module_args, module_kwargs

    def build(self, log: bool = False) -> torch.nn.Module:
        return self.typename(*self.module_args, **self.module_kwargs)

    def __repr__(self) -> str:
        args = [repr(a) for a in self.module_args] + [f"{k}={v!r}" for k, v in self.module_kwargs.items()]
        return f"{type(self).__name__}({self.typename.__name__}, {', '.join(args)})".replace(", )", ")")

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)


class TiedLayerSpec(LayerSpec):
    """A LayerSpec whose `tied_weight_attr` parameters are shared by every layer with the same `key`
    (e.g. input embedding and output projection); `forward_fn(module, x)` replaces the module's forward
    where given."""

    def __init__(self, key: str, typename: type, *module_args: Any, forward_fn: Optional[Callable] = None,
                 tied_weight_attr: Union[str, List[str]] = "weight", **module_kwargs: Any):
        super().__init__(typename, *module_args, **module_kwargs)
        self.key, self.forward_fn = key, forward_fn
        self.tied_weight_attr = [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)


class PipelineModule(torch.nn.Module):
    """DeepSpeed's `PipelineModule(layers, num_stages, loss_fn, partition_method, topology, ...)`: not
    implemented by dsrun yet (docs/pipeline.md). The schedules it would run are in
    `dsrun.pipe.schedule`."""

    def __init__(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("pipeline parallelism (dsrun.pipe.PipelineModule) is not implemented by "
                                  "dsrun yet: the schedules exist (dsrun.pipe.schedule), the pipeline engine "
                                  "does not (docs/pipeline.md)")
