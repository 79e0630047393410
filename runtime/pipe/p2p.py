"""Point-to-point exchange between adjacent pipeline stages: activations forward, their gradients back.

A message is a tensor or a tuple of tensors. Before the first activation of a kind ("train" or "eval")
the sender sends its meta (count, tuple or not, and per tensor dtype, requires_grad and shape) and both
sides cache it: later messages are only the tensors, received into buffers allocated from the meta.
`reset()` (the engine's `reset_activation_shape()`) or `dynamic_shape=True` re-sends it. Meta is kept per
kind because an eval forward runs without autograd (no tensor requires grad), and a train step after an
eval step must still know which activations carry gradients back (DeepSpeed #3649).

Gradients flow back only for the activations whose meta says `requires_grad`: the sender's output
required grad, so it is in the sender's graph. The receiver marks exactly those inputs as requiring grad;
a received input that backward left without a gradient is sent back as zeros (its layers did not use it).

Sends and receives are blocking (`dist.send`/`dist.recv`: gloo on CPU, NCCL on GPU); the lock-step 1F1B
and inference schedules pair every send with the receive of the neighbour's same step, so the order on
each pair of ranks matches.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.distributed as dist

__all__ = ["StageP2P", "TensorMeta"]

Message = Union[torch.Tensor, Tuple[torch.Tensor, ...]]

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool]
_MAX_META = 256  # int64 words in one meta message


class TensorMeta:
    """Shapes, dtypes and requires_grad of one message; `as_tuple` says whether it was a tuple."""

    def __init__(self, specs: Sequence[Tuple[torch.Size, torch.dtype, bool]], as_tuple: bool):
        self.specs, self.as_tuple = list(specs), as_tuple

    @classmethod
    def of(cls, msg: Message) -> "TensorMeta":
        tensors = msg if isinstance(msg, tuple) else (msg,)
        for t in tensors:
            if not torch.is_tensor(t):
                raise TypeError(f"a pipeline stage may pass only tensors or tuples of tensors to the next stage, "
                                f"got a {type(t).__name__} in its output")
        return cls([(t.shape, t.dtype, t.requires_grad) for t in tensors], isinstance(msg, tuple))

    def encode(self) -> List[int]:
        words = [len(self.specs), int(self.as_tuple)]
        for shape, dtype, requires_grad in self.specs:
            words += [_DTYPES.index(dtype), int(requires_grad), len(shape), *shape]
        if len(words) > _MAX_META:
            raise ValueError(f"pipeline activation meta too large ({len(words)} words > {_MAX_META})")
        return words + [0] * (_MAX_META - len(words))

    @classmethod
    def decode(cls, words: List[int]) -> "TensorMeta":
        count, as_tuple, pos, specs = words[0], bool(words[1]), 2, []
        for _ in range(count):
            dtype, requires_grad, ndim = _DTYPES[words[pos]], bool(words[pos + 1]), words[pos + 2]
            specs.append((torch.Size(words[pos + 3:pos + 3 + ndim]), dtype, requires_grad))
            pos += 3 + ndim
        return cls(specs, as_tuple)


class StageP2P:
    """The sends and receives of one stage to its neighbours `prev_rank` / `next_rank` (global ranks,
    None at the ends of the pipeline)."""

    def __init__(self, *, prev_rank, next_rank, device: torch.device, dynamic_shape: bool = False):
        self.prev_rank, self.next_rank, self.device = prev_rank, next_rank, device
        self.dynamic_shape = dynamic_shape
        self._sent: Dict[str, TensorMeta] = {}  # kind -> meta of what this stage sends forward
        self._received: Dict[str, TensorMeta] = {}  # kind -> meta of what it receives

    def reset(self) -> None:
        """Forget cached meta (both neighbours must reset too: call on every rank)."""
        self._sent.clear()
        self._received.clear()

    def send_activations(self, msg: Message, kind: str) -> None:
        if kind not in self._sent or self.dynamic_shape:
            meta = TensorMeta.of(msg)
            dist.send(torch.tensor(meta.encode(), dtype=torch.int64, device=self.device), self.next_rank)
            self._sent[kind] = meta
        for t in (msg if isinstance(msg, tuple) else (msg,)):
            dist.send(t.detach().contiguous(), self.next_rank)

    def recv_activations(self, kind: str) -> Message:
        if kind not in self._received or self.dynamic_shape:
            words = torch.zeros(_MAX_META, dtype=torch.int64, device=self.device)
            dist.recv(words, self.prev_rank)
            self._received[kind] = TensorMeta.decode(words.tolist())
        meta = self._received[kind]
        out = []
        for shape, dtype, requires_grad in meta.specs:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            dist.recv(t, self.prev_rank)
            out.append(t.requires_grad_(requires_grad and kind == "train"))
        return tuple(out) if meta.as_tuple else out[0]

    def send_grads(self, inputs: Message) -> None:
        """The gradients of the received `inputs` that carry one (per the received meta), to prev."""
        meta = self._received["train"]
        tensors = inputs if isinstance(inputs, tuple) else (inputs,)
        for t, (_, _, requires_grad) in zip(tensors, meta.specs):
            if requires_grad:
                grad = t.grad if t.grad is not None else torch.zeros_like(t)
                dist.send(grad.contiguous(), self.prev_rank)

    def recv_grads(self) -> List:
        """Gradients for this stage's sent outputs, in order; None where the output carries none."""
        meta = self._sent["train"]
        grads = []
        for shape, dtype, requires_grad in meta.specs:
            if requires_grad:
                g = torch.empty(shape, dtype=dtype, device=self.device)
                dist.recv(g, self.next_rank)
                grads.append(g)
            else:
                grads.append(None)
        return grads
