"""`LayerSpec`, `TiedLayerSpec` (DeepSpeed's layer descriptions) and `PipelineModule`: a sequence of layers
split into pipeline stages, of which each rank builds only its own stage's layers.

    model = PipelineModule(layers=[LayerSpec(Embed, 64), *[LayerSpec(Block, 64) for _ in range(8)],
                                   LayerSpec(Head, 64)], num_stages=2, loss_fn=torch.nn.functional.cross_entropy)
    engine, *_ = dsrun.initialize(model=model, config=cfg)   # -> PipelineEngine (engine.py)

Layer i's module is registered as attribute `str(i)` and a tied module under `tied_modules.<key>`, as in
DeepSpeed, so parameter names (`3.weight`, `tied_modules.embed.weight`) are the same whatever the
partition: per-layer checkpoints and optimizer state are keyed by them (checkpoint.py).
Partition planning is pure (partition.py); the process grid is topology.py's.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.distributed as dist

from ..checkpointing import checkpoint as _default_checkpoint
from .partition import LayerInfo, plan_partition
from .topology import PipeDataParallelTopology, PipelineParallelGrid, ProcessTopology

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


def _get_attr(module: torch.nn.Module, dotted: str):
    """`module.a.b` for 'a.b' (tied weights may name nested attributes)."""
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _check_tied_attrs(spec: "TiedLayerSpec", module: torch.nn.Module) -> torch.nn.Module:
    """Each `tied_weight_attr` of a freshly built tied module names one of its parameters; else a UsageError
    naming the key, the module and the parameters it has (DeepSpeed fails later with a bare AttributeError)."""
    names = dict(module.named_parameters())
    for attr in spec.tied_weight_attr:
        if attr not in names:
            from dsrun.errors import UsageError
            raise UsageError(f"TiedLayerSpec {spec.key!r}: {type(module).__name__} has no parameter {attr!r} to tie "
                             f"(tied_weight_attr)", hint="its parameters: " + (", ".join(names) or "none"))
    return module


class PipelineModule(torch.nn.Module):
    """DeepSpeed's `PipelineModule` (see the module docstring). Collective: every rank of the world
    constructs it (process groups are created, [Note: deterministic group creation] in topology.py).

    Args:
        layers: LayerSpec, TiedLayerSpec, nn.Module instances or plain callables (e.g. a reshape), run in
            order; the output of one is the input of the next (a tensor or a tuple of tensors).
        num_stages / topology: the number of pipeline stages, or a ProcessTopology with a 'pipe' axis
            (and usually 'data'); one of the two is required.
        loss_fn: `loss_fn(outputs, labels)` on the last stage; None means the last layer returns the loss.
        seed_layers / seed_fn / base_seed: seed `base_seed + i` (through `seed_fn`, default
            torch.manual_seed) before building layer i, and `base_seed * micro_batch + i` before running it.
        partition_method: 'parameters' (default), 'uniform' or 'type:<regex>' (partition.py).
        activation_checkpoint_interval: run every group of that many local layers under
            `activation_checkpoint_func` (0: off); groups without parameters are not checkpointed unless
            `checkpointable_layers` (class names) says so.
        num_chunks: dsrun's interleaved pipeline (Megatron's virtual stages): the layers are split into
            num_stages * num_chunks parts and stage s holds parts s, s + num_stages, ...; the engine then
            runs the interleaved 1F1B schedule (schedule.py). 1 (default) is DeepSpeed's layout.
    Raises:
        RuntimeError: neither num_stages nor topology, or the world does not divide into the stages
            (DeepSpeed's messages); NotImplementedError for a nested PipelineModule.
    """

    def __init__(self, layers, num_stages: Optional[int] = None, topology: Optional[ProcessTopology] = None,
                 loss_fn: Optional[Callable] = None, seed_layers: bool = False, seed_fn: Optional[Callable] = None,
                 base_seed: int = 1234, partition_method: str = "parameters", activation_checkpoint_interval: int = 0,
                 activation_checkpoint_func: Callable = _default_checkpoint,
                 checkpointable_layers: Optional[List[str]] = None, dynamic_shape: bool = False,
                 num_chunks: int = 1):
        super().__init__()
        if num_stages is None and topology is None:
            raise RuntimeError("must provide num_stages or topology")
        self._layer_specs = list(layers)
        if any(isinstance(layer, PipelineModule) for layer in self._layer_specs):
            raise NotImplementedError("a PipelineModule inside a PipelineModule is not supported")
        from ..dist import init_distributed
        init_distributed()
        world = dist.get_world_size()
        if topology is None:
            if world % num_stages != 0:
                raise RuntimeError(f"num_stages ({num_stages}) must divide distributed world size ({world})")
            topology = PipeDataParallelTopology(num_pp=num_stages, num_dp=world // num_stages)
        elif num_stages is not None and topology.get_dim("pipe") != num_stages:
            raise RuntimeError(f"num_stages={num_stages} but the topology has {topology.get_dim('pipe')} stages")
        if topology.get_dim("model") > 1:
            raise NotImplementedError("a 'model' (tensor-parallel) axis in the pipeline topology is not supported "
                                      "by dsrun yet; use PipeDataParallelTopology")
        self.loss_fn, self.seed_layers, self.seed_fn, self.base_seed = loss_fn, seed_layers, seed_fn, base_seed
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.activation_checkpoint_func = activation_checkpoint_func
        self.checkpointable_layers = checkpointable_layers
        self.dynamic_shape = dynamic_shape
        self._topo = topology
        self._grid = PipelineParallelGrid(topology)
        self.num_stages = topology.get_dim("pipe")
        self.stage_id = self._grid.get_stage_id()
        self.global_rank = dist.get_rank()
        self.world_size = world
        self.micro_offset = 0
        self.partition_method = partition_method
        if num_chunks < 1 or (num_chunks > 1 and self.num_stages < 2):
            raise ValueError(f"num_chunks must be >= 1, and 1 with a single stage; got {num_chunks} with "
                             f"{self.num_stages} stage(s)")
        self.num_chunks = num_chunks
        infos = self._layer_infos(count_params=partition_method.lower() == "parameters")
        self.parts = plan_partition(partition_method, infos, self.num_stages * num_chunks)
        # per local chunk c (virtual stage c * num_stages + stage_id): its global layer indices
        self._chunk_layers = [list(range(self.parts[c * self.num_stages + self.stage_id],
                                         self.parts[c * self.num_stages + self.stage_id + 1]))
                              for c in range(num_chunks)]
        self._local_indices = [idx for chunk in self._chunk_layers for idx in chunk]
        self._local_start = self._local_indices[0] if self._local_indices else self.parts[self.stage_id]
        self._local_stop = self._local_indices[-1] + 1 if self._local_indices else self._local_start
        self.forward_funcs: List[Callable] = []
        self.tied_modules = torch.nn.ModuleDict()
        self.tied_weight_attrs: Dict[str, List[str]] = {}
        self._build()
        self.tied_comms = self._index_tied_modules()

    # -- construction --------------------------------------------------------------------------------

    def _layer_infos(self, count_params: bool) -> List[LayerInfo]:
        """Class name of every layer and, when `count_params`, its trainable parameter count. LayerSpecs are
        counted by building them on the meta device (no memory, no initialisation); a layer that cannot be
        built there is built normally and dropped."""
        infos = []
        for layer in self._layer_specs:
            if isinstance(layer, LayerSpec):
                infos.append(LayerInfo(layer.typename.__name__, _spec_numel(layer) if count_params else 0))
            elif isinstance(layer, torch.nn.Module):
                infos.append(LayerInfo(type(layer).__name__, _trainable_numel(layer)))
            else:
                infos.append(LayerInfo(getattr(layer, "__name__", type(layer).__name__), 0))
        return infos

    def _seed(self, seed: int) -> None:
        (self.seed_fn or torch.manual_seed)(seed)

    def _build(self) -> None:
        for idx in self._local_indices:
            layer = self._layer_specs[idx]
            if self.seed_layers:
                self._seed(self.base_seed + idx)
            if isinstance(layer, TiedLayerSpec):
                if layer.key not in self.tied_modules:
                    self.tied_modules[layer.key] = _check_tied_attrs(layer, layer.build())
                    self.tied_weight_attrs[layer.key] = layer.tied_weight_attr
                module = self.tied_modules[layer.key]
                self.forward_funcs.append(functools.partial(layer.forward_fn, module) if layer.forward_fn else module)
            elif isinstance(layer, LayerSpec):
                module = layer.build()
                self.add_module(str(idx), module)
                self.forward_funcs.append(module)
            elif isinstance(layer, torch.nn.Module):
                self.add_module(str(idx), layer)
                self.forward_funcs.append(layer)
            elif callable(layer):
                self.forward_funcs.append(layer)
            else:
                raise TypeError(f"layer {idx} is a {type(layer).__name__}: expected a LayerSpec, nn.Module or callable")

    def _tie_stages(self) -> Dict[str, List[int]]:
        stages: Dict[str, set] = {}
        for idx, layer in enumerate(self._layer_specs):
            if isinstance(layer, TiedLayerSpec):
                stages.setdefault(layer.key, set()).add(self.stage_owner(idx))
        return {key: sorted(v) for key, v in stages.items()}

    def _index_tied_modules(self) -> Dict[str, dict]:
        """Per tie key held here: the ranks of its tie group (the stages holding the key, this rank's data
        coordinate) and the group (None when a single stage holds it). Keys go in sorted order on every
        rank ([Note: deterministic group creation])."""
        comms = {}
        for key, stages in sorted(self._tie_stages().items()):
            if len(stages) < 2:
                if key in self.tied_modules:
                    comms[key] = {"ranks": [self.global_rank], "group": None, "weight_attr": self.tied_weight_attrs[key]}
                continue
            for dp in range(max(self._topo.get_dim("data"), 1)):
                coord = {"data": dp} if "data" in self._topo.get_axis_names() else {}
                ranks = [self._topo.get_rank(pipe=s, **coord) for s in stages]
                group = dist.new_group(ranks=ranks)
                if self.global_rank in ranks:
                    comms[key] = {"ranks": ranks, "group": group, "weight_attr": self.tied_weight_attrs[key]}
        return comms

    # -- tied weights --------------------------------------------------------------------------------

    def get_tied_weights_and_groups(self):
        """[(parameter, tie group or None, owner rank)] for every tied weight held here."""
        out = []
        for key, comm in self.tied_comms.items():
            for attr in comm["weight_attr"]:
                out.append((_get_attr(self.tied_modules[key], attr), comm["group"], comm["ranks"][0]))
        return out

    def is_tied_replica(self, param: torch.Tensor) -> bool:
        """True for a tied weight whose copy on a lower stage counts (norms, optimizer-state files)."""
        return any(p is param and owner != self.global_rank for p, _, owner in self.get_tied_weights_and_groups())

    @torch.no_grad()
    def synchronize_tied_weights(self) -> None:
        """Give every stage holding a tied weight the copy of the lowest rank of its tie group (collective
        over the tie groups; call once the module is on its device)."""
        for param, group, owner in self.get_tied_weights_and_groups():
            if group is not None:
                dist.broadcast(param.data, src=owner, group=group)

    def allreduce_tied_weight_gradients(self, grad_of: Callable = lambda p: p.grad, comm=None) -> None:
        """Sum the gradients of each tied weight over the stages holding it (DeepSpeed's ReduceTiedGrads);
        through `comm` (the engine's PipeComm, which the monitor taps) when given."""
        all_reduce = comm.all_reduce if comm is not None else dist.all_reduce
        for param, group, _ in self.get_tied_weights_and_groups():
            grad = grad_of(param)
            if group is not None and grad is not None:
                all_reduce(grad, group=group)

    # -- forward -------------------------------------------------------------------------------------

    def _exec_range(self, start: int, end: int) -> Callable:
        offset = self.micro_offset

        def run(*inputs):
            x = inputs[0] if len(inputs) == 1 else inputs
            for i in range(start, end):
                if self.seed_layers:
                    self._seed(self.base_seed * offset + self._local_indices[i])
                x = self.forward_funcs[i](x)
            return x
        return run

    def _is_checkpointable(self, funcs) -> bool:
        if self.checkpointable_layers is not None:
            return all(type(f).__name__ in self.checkpointable_layers for f in funcs)
        return any(isinstance(f, torch.nn.Module) and next(f.parameters(), None) is not None for f in funcs)

    def forward(self, forward_input, chunk: int = 0):
        """This stage's layers (of model chunk `chunk`) in order, grouped under activation checkpointing
        when an interval is set."""
        self.micro_offset += 1
        first = sum(len(c) for c in self._chunk_layers[:chunk])
        n = first + len(self._chunk_layers[chunk])
        if self.activation_checkpoint_interval <= 0:
            return self._exec_range(first, n)(forward_input)
        x = forward_input
        for start in range(first, n, self.activation_checkpoint_interval):
            end = min(start + self.activation_checkpoint_interval, n)
            x = x if isinstance(x, tuple) else (x,)
            run = self._exec_range(start, end)
            if self._is_checkpointable(self.forward_funcs[start:end]) and torch.is_grad_enabled():
                x = self.activation_checkpoint_func(run, *x)
            else:
                x = run(*x)
        return x

    # -- queries (DeepSpeed's names) -------------------------------------------------------------------

    def topology(self) -> ProcessTopology:
        return self._topo

    def mpu(self) -> PipelineParallelGrid:
        return self._grid

    def num_pipeline_stages(self) -> int:
        return self.num_stages

    def stage_owner(self, layer_idx: int) -> int:
        """The stage holding layer `layer_idx`."""
        for part in range(len(self.parts) - 1):
            if self.parts[part] <= layer_idx < self.parts[part + 1]:
                return part % self.num_stages
        raise RuntimeError(f"layer {layer_idx} is not in any stage (layers: {len(self._layer_specs)})")

    def local_layers(self):
        """(global layer index, module or None) for each layer of this stage; a tied layer's module is the
        shared tied module, a plain callable's is None."""
        for idx in self._local_indices:
            layer = self._layer_specs[idx]
            if isinstance(layer, TiedLayerSpec):
                yield idx, self.tied_modules[layer.key]
            else:
                module = self._modules.get(str(idx))
                yield idx, module

    def ckpt_layer_path(self, ckpt_dir: str, layer_idx: int) -> str:
        import os
        return os.path.join(ckpt_dir, f"layer_{layer_idx:02d}-model_states.pt")


def _trainable_numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _spec_numel(spec: LayerSpec) -> int:
    try:
        with torch.device("meta"):
            return _trainable_numel(spec.build())
    except Exception:  # a layer whose constructor needs real tensors (reads data, calls .item(), ...)
        return _trainable_numel(spec.build())
