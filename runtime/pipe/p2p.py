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

Receives are blocking; sends are `isend`s on a two-rank group per channel, completed at the end of the
batch ([Note: p2p channels]); gloo on CPU, NCCL on GPU. Within a channel messages match in order.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from .comm import PipeComm

__all__ = ["StageP2P", "TensorMeta", "channel_groups", "channels"]

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
    """The sends and receives of one stage (global ranks `prev_rank` / `next_rank` of the stages before and
    after it; with model chunks they wrap around the ring, else None at the ends of the pipeline).

    [Note: p2p channels] Every pipeline of two or more stages sends through channels (`ordered`). For
    1F1B this is for speed: a blocking send on NCCL makes the sender's compute stream wait until the
    receiver has posted its receive, and both directions share the default group's stream, so each stage
    idled on its neighbour once per micro-batch (2 x H200, B3 blocks, m=16: 0.889 of the unpipelined
    rate with blocking sends; RESULTS.md 2026-11-30). The interleaved schedule is ordered, not lock-stepped: it is deadlock-free only if a
    send never waits for its receive (simulate.py's model). Between the same two ranks it carries
    activations and gradients of several chunks, in both directions (with 2 stages, virtual stage 1 sends
    back to stage 0), and a stage's forwards and backwards interleave differently on the two sides. So
    each channel (kind, sending stage) gets its own two-rank process group (`channel_groups`), in which
    messages match in order, and sends are `isend`s completed by `wait_sends()` at the end of the batch.
    On NCCL a group's pair shares one stream: two directions in one group could each wait for a receive
    queued behind the other's send. The chunks of one stage share its channels: every stage runs its
    forwards (and its backwards) in one (chunk, micro-batch) order, so the activations stage s sends, over
    all its chunks, arrive in the order stage s+1 needs them (the last stage's go around to stage 0's
    next chunk), and the same for gradients; simulate() checks that match for every schedule in the
    tests. That is 2 x S channels per pipeline whatever the number of chunks (it was one per virtual
    stage: 2 x (S x v - 1), each an NCCL communicator with its own buffers and stream). On 2 H200 (B3,
    2 stages x 2 chunks, m=16) the interleaved schedule went from 0.919 of the unpipelined rate to 0.928
    with the shared channels (RESULTS.md, 2026-11-30 ~05:25).
    """

    def __init__(self, *, prev_rank, next_rank, device: torch.device, dynamic_shape: bool = False,
                 num_stages: int = 1, stage_id: int = 0, groups: Optional[Dict[Tuple[str, int], object]] = None,
                 comm: Optional[PipeComm] = None):
        self.prev_rank, self.next_rank, self.device = prev_rank, next_rank, device
        self.comm = comm or PipeComm()  # the monitor's tap point (comm.py)
        self.dynamic_shape = dynamic_shape
        self.num_stages, self.stage_id = num_stages, stage_id
        self.groups = groups or {}
        self.ordered = bool(groups)
        self._sent: Dict[tuple, TensorMeta] = {}  # (kind, chunk) -> meta of what that chunk sends forward
        self._received: Dict[tuple, TensorMeta] = {}  # (kind, chunk) -> meta of what that chunk receives

    def connect(self) -> None:
        """Ordered mode: one blocking exchange of a single element on each of this rank's channels, in the
        channels' sorted order (the same relative order on both ranks of every channel, so the rendezvous
        cannot deadlock). NCCL creates a pair's communicator at its first use and that creation blocks
        until the peer arrives: a first use in the middle of the schedule would be a blocking send."""
        for (kind, sender), group in sorted(self.groups.items()):
            flag = torch.zeros(1, device=self.device)
            if sender == self.stage_id:
                dist.send(flag, self.next_rank if kind == "act" else self.prev_rank, group=group)
            else:
                dist.recv(flag, self.prev_rank if kind == "act" else self.next_rank, group=group)

    def reset(self) -> None:
        """Forget cached meta (both neighbours must reset too: call on every rank)."""
        self._sent.clear()
        self._received.clear()

    def _channel(self, kind: str, sender: int) -> Tuple[str, int]:
        """The channel of messages of `kind` sent by stage `sender` (around the ring with chunks)."""
        return kind, sender % self.num_stages

    def _send(self, t: torch.Tensor, dst: int, channel: Tuple[str, int]) -> None:
        self.comm.send(t, dst=dst, group=self.groups[channel] if self.ordered else None, ordered=self.ordered)

    def _recv(self, t: torch.Tensor, src: int, channel: Tuple[str, int]) -> None:
        self.comm.recv(t, src=src, group=self.groups.get(channel))

    def wait_sends(self) -> None:
        """Complete every outstanding send (ordered mode; a no-op otherwise)."""
        self.comm.wait_sends()

    def send_activations(self, msg: Message, kind: str, chunk: int = 0) -> None:
        channel = self._channel("act", self.stage_id)
        if (kind, chunk) not in self._sent or self.dynamic_shape:
            meta = TensorMeta.of(msg)
            self._send(torch.tensor(meta.encode(), dtype=torch.int64, device=self.device), self.next_rank, channel)
            self._sent[(kind, chunk)] = meta
        for t in (msg if isinstance(msg, tuple) else (msg,)):
            self._send(t.detach().contiguous(), self.next_rank, channel)

    def recv_activations(self, kind: str, chunk: int = 0) -> Message:
        channel = self._channel("act", self.stage_id - 1)
        if (kind, chunk) not in self._received or self.dynamic_shape:
            words = torch.zeros(_MAX_META, dtype=torch.int64, device=self.device)
            self._recv(words, self.prev_rank, channel)
            self._received[(kind, chunk)] = TensorMeta.decode(words.tolist())
        meta = self._received[(kind, chunk)]
        out = []
        for shape, dtype, requires_grad in meta.specs:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            self._recv(t, self.prev_rank, channel)
            out.append(t.requires_grad_(requires_grad and kind == "train"))
        return tuple(out) if meta.as_tuple else out[0]

    def send_grads(self, inputs: Message, chunk: int = 0) -> None:
        """The gradients of the received `inputs` that carry one (per the received meta), to prev."""
        meta = self._received[("train", chunk)]
        tensors = inputs if isinstance(inputs, tuple) else (inputs,)
        for t, (_, _, requires_grad) in zip(tensors, meta.specs):
            if requires_grad:
                grad = t.grad if t.grad is not None else torch.zeros_like(t)
                self._send(grad.contiguous(), self.prev_rank, self._channel("grad", self.stage_id))

    def recv_grads(self, chunk: int = 0) -> List:
        """Gradients for this chunk's sent outputs, in order; None where the output carries none."""
        channel = self._channel("grad", self.stage_id + 1)
        meta = self._sent[("train", chunk)]
        grads = []
        for shape, dtype, requires_grad in meta.specs:
            if requires_grad:
                g = torch.empty(shape, dtype=dtype, device=self.device)
                self._recv(g, self.next_rank, channel)
                grads.append(g)
            else:
                grads.append(None)
        return grads


def channels(stages: int, num_chunks: int) -> List[Tuple[str, int, int]]:
    """(kind, sending stage, receiving stage) of every channel ([Note: p2p channels]): activations to the
    next stage, gradients to the previous one; with model chunks also around the ring (S-1 -> 0, 0 -> S-1)."""
    out = []
    for kind, step in (("act", 1), ("grad", -1)):
        for sender in range(stages):
            receiver = sender + step
            if 0 <= receiver < stages or (num_chunks > 1 and stages > 1):
                out.append((kind, sender, receiver % stages))
    return out


def channel_groups(grid, num_chunks: int) -> Dict[Tuple[str, int], object]:
    """This rank's two-rank groups of the pipeline's channels, keyed by (kind, sending stage) ([Note: p2p
    channels]). Collective: every rank creates every group of every data-parallel replica, in one order
    ([Note: deterministic group creation] in topology.py)."""
    stages = grid.get_pipe_parallel_world_size()
    topo = grid.topology
    data = [{"data": d} for d in range(topo.get_dim("data"))] if "data" in topo.get_axis_names() else [{}]
    mine = {}
    for kind, sender, receiver in channels(stages, num_chunks):
        for coord in data:
            ranks = [topo.get_rank(pipe=sender, **coord), topo.get_rank(pipe=receiver, **coord)]
            group = dist.new_group(ranks=sorted(ranks))
            if grid.global_rank in ranks:
                mine[(kind, sender)] = group
    return mine
