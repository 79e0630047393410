"""dsrun.checkpointing: same outputs and gradients as without checkpointing (dropout included), for the
reentrant and non-reentrant forms, with non-tensor arguments and outputs, cpu_checkpointing and
partition_activations; and the memory saving, counted as bytes saved for backward.

Measured (test_saved_bytes_shrink, CPU, 8 blocks of Linear(256,1024)-GELU-Dropout-Linear(1024,256), batch
64, fp32): 6,815,744 bytes of activations saved for backward without checkpointing, 524,288 with it
(the 8 block inputs only), 13.0x less; parameters excluded from both counts.
"""
import pytest
import torch

import dsrun
from dsrun.errors import ConfigError
from dsrun.runtime.checkpointing import function as ckpt_function

ck = dsrun.checkpointing


@pytest.fixture(autouse=True)
def _unconfigured():
    ck.reset()
    ck.get_cuda_rng_tracker().reset()
    yield
    ck.reset()
    ck.get_cuda_rng_tracker().reset()


class Block(torch.nn.Module):
    def __init__(self, width=16, hidden=32):
        super().__init__()
        self.up, self.down = torch.nn.Linear(width, hidden), torch.nn.Linear(hidden, width)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x, scale, tag, use_tracker=False):
        h = self.drop(torch.nn.functional.gelu(self.up(x)))
        if use_tracker:
            with ck.get_cuda_rng_tracker().fork():
                h = self.drop(h)
        y = self.down(h) * scale + x
        return y, tag + "!", torch.tensor(len(tag))  # non-tensor and integer outputs


def _run(form, blocks=3, use_tracker=False, x_requires_grad=True):
    torch.manual_seed(0)
    model = torch.nn.ModuleList(Block() for _ in range(blocks))
    x = torch.randn(8, 16, requires_grad=x_requires_grad)
    torch.manual_seed(1)
    if use_tracker:
        ck.model_parallel_cuda_manual_seed(1)
    h, tags = x, []
    for block in model:
        args = (h, 0.5, "t", use_tracker)
        out = block(*args) if form == "plain" else ck.checkpoint(block, *args, use_reentrant=form == "reentrant")
        h, tag, count = out
        tags.append((tag, int(count)))
    h.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return h.detach(), (x.grad.clone() if x_requires_grad else None), grads, tags, torch.rand(1)


def _assert_same(a, b):
    out_a, xg_a, g_a, tags_a, rng_a = a
    out_b, xg_b, g_b, tags_b, rng_b = b
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    if xg_a is not None:
        torch.testing.assert_close(xg_a, xg_b, rtol=0, atol=0)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], rtol=0, atol=0, msg=name)
    assert tags_a == tags_b == [("t!", 1)] * len(tags_a)
    assert torch.equal(rng_a, rng_b)  # the RNG stream after backward is where it would be without recompute


@pytest.mark.parametrize("form", ["reentrant", "non_reentrant"])
def test_same_outputs_and_gradients_with_dropout(form):
    _assert_same(_run("plain"), _run(form))


@pytest.mark.parametrize("form", ["reentrant", "non_reentrant"])
def test_model_parallel_tracker_state_is_replayed(form):
    _assert_same(_run("plain", use_tracker=True), _run(form, use_tracker=True))


def test_parameters_get_gradients_when_no_input_requires_grad():
    plain, ckpt = _run("plain", x_requires_grad=False), _run("reentrant", x_requires_grad=False)
    _assert_same(plain, ckpt)


@pytest.mark.parametrize("form", ["reentrant", "non_reentrant"])
def test_keyword_arguments_pass_through(form):
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(8, 16, requires_grad=True)
    y, tag, _ = ck.checkpoint(block, x, use_reentrant=form == "reentrant", scale=2.0, tag="k")
    y.sum().backward()
    assert tag == "k!" and x.grad is not None and block.up.weight.grad is not None


def test_recompute_differs_without_rng_restore_would_be_caught():
    # Guard for the test itself: dropout really is random here, so equality above means RNG was restored.
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(8, 16)
    assert not torch.equal(block(x, 1.0, "")[0], block(x, 1.0, "")[0])


def test_cpu_checkpointing_same_gradients():
    ck.configure(None, checkpoint_in_cpu=True)
    _assert_same(_run("plain"), _run("reentrant"))


def test_reentrant_releases_each_input_after_its_backward():
    """A checkpoint's saved input lives until that checkpoint's backward, not until the whole graph is
    freed: a reference kept on the autograd node held every block input through the backward (1.4 GiB on
    B3 at micro-batch 8, RESULTS.md 2026-11-30)."""
    import weakref
    torch.manual_seed(0)
    blocks = [Block() for _ in range(3)]
    h = torch.randn(8, 16, requires_grad=True)
    inputs = []
    for block in blocks:
        h = ck.checkpoint(block, h, 1.0, "")[0]
        inputs.append(weakref.ref(h.untyped_storage()))  # the memory, whatever tensor views it
    loss = h.sum()
    del h
    loss.backward()  # `loss` keeps the graph and its nodes alive
    assert [ref() is None for ref in inputs[:-1]] == [True, True]


def _run_cuda(form, blocks=6):
    torch.manual_seed(0)
    model = torch.nn.ModuleList(Block(64, 256) for _ in range(blocks)).cuda()
    x = torch.randn(32, 64, device="cuda", requires_grad=True)
    h = x
    for block in model:
        h = (block(h, 0.5, "t") if form == "plain" else ck.checkpoint(block, h, 0.5, "t"))[0]
    h.pow(2).sum().backward()
    return h.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.gpu
def test_cpu_checkpointing_on_gpu_gives_the_same_gradients():
    """Inputs copied out to pinned memory on the copy stream and back, each one prefetched while the
    checkpoint after it recomputes ([Note: host checkpoints]): bit-identical to no checkpointing, dropout
    included, with the input memory reused in between (a second batch runs in the same memory)."""
    plain = _run_cuda("plain")
    ck.configure(None, checkpoint_in_cpu=True)
    for _ in range(2):
        out, x_grad, grads = _run_cuda("reentrant")
        torch.testing.assert_close(out, plain[0], rtol=0, atol=0)
        torch.testing.assert_close(x_grad, plain[1], rtol=0, atol=0)
        for name, g in grads.items():
            torch.testing.assert_close(g, plain[2][name], rtol=0, atol=0, msg=name)


@pytest.mark.gpu
def test_cpu_checkpointing_saves_inputs_on_cpu_gpu():
    ck.configure(None, checkpoint_in_cpu=True)
    block = Block().cuda()
    x = torch.randn(8, 16, device="cuda", requires_grad=True)
    devices = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: devices.append(t.device.type) or t, lambda t: t):
        y = ck.checkpoint(block, x, 1.0, "")[0]
    assert devices == ["cpu"]
    y.sum().backward()
    assert x.grad is not None and x.grad.device.type == "cuda"


def _saved_bytes(form, blocks=8, width=256, hidden=1024, batch=64):
    torch.manual_seed(0)
    model = torch.nn.ModuleList(Block(width, hidden) for _ in range(blocks))
    x = torch.randn(batch, width, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        # activations only (a Linear also saves its weight), each storage once (two ops may save one tensor)
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = x
        for block in model:
            h = (block(h, 1.0, "") if form == "plain" else ck.checkpoint(block, h, 1.0, ""))[0]
    h.sum().backward()
    return sum(seen.values())


def test_saved_bytes_shrink():
    """Figures in the module docstring and docs/pipeline.md."""
    plain, ckpt = _saved_bytes("plain"), _saved_bytes("reentrant")
    assert ckpt == 8 * 64 * 256 * 4  # exactly the block inputs
    assert plain > 10 * ckpt, (plain, ckpt)
    print(f"saved for backward: {plain:,} bytes plain, {ckpt:,} checkpointed, {plain / ckpt:.1f}x")


def test_configure_from_config_section_and_overrides():
    cfg = {"train_batch_size": 1, "activation_checkpointing": {
        "partition_activations": True, "cpu_checkpointing": True, "profile": True,
        "synchronize_checkpoint_boundary": True, "number_checkpoints": 4}}
    assert not ck.is_configured()
    ck.configure(None, deepspeed_config=cfg, checkpoint_in_cpu=False)
    s = ck.settings.SETTINGS
    assert ck.is_configured()
    assert (s.partition_activations, s.cpu_checkpointing, s.profile, s.synchronize, s.number_checkpoints) == \
        (True, False, True, True, 4)
    assert not s.partitions()  # no mpu: partitioning is a no-op
    _assert_same(_run("plain"), _run("reentrant"))
    assert [k for k, _ in ckpt_function.PROFILE] == ["forward"] * 3 + ["backward"] * 3
    ck.reset()
    assert not ck.is_configured() and not ckpt_function.PROFILE


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="activation_checkpointing.partition_activation"):
        ck.configure(None, deepspeed_config={"train_batch_size": 1,
                                             "activation_checkpointing": {"partition_activation": True}})
    with pytest.raises(ConfigError, match="contiguous_memory_optimization requires partition_activations"):
        ck.configure(None, contiguous_checkpointing=True, num_checkpoints=2)
    with pytest.raises(ConfigError, match="number_checkpoints"):
        ck.configure(None, partition_activations=True, contiguous_checkpointing=True)
    assert not ck.is_configured()


def test_rng_tracker_api():
    tracker = ck.get_cuda_rng_tracker()
    tracker.add("a", 5)
    with pytest.raises(Exception, match="seed 5 already exists"):
        tracker.add("b", 5)
    before = torch.get_rng_state()
    with tracker.fork("a"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    states = tracker.get_states()
    with tracker.fork("a"):
        second = torch.rand(3)
    tracker.set_states(states)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(3), second) and not torch.equal(first, second)
    with pytest.raises(Exception, match="not added"):
        with tracker.fork("nope"):
            pass


class _WorldMpu:
    """The whole (2-rank) world as one model-parallel group."""

    def get_model_parallel_rank(self):
        return torch.distributed.get_rank()

    def get_model_parallel_world_size(self):
        return torch.distributed.get_world_size()

    def get_model_parallel_group(self):
        return torch.distributed.group.WORLD


def _partitioned(rank, world_size):
    plain = _run("plain")
    ck.configure(_WorldMpu(), partition_activations=True)
    ck.model_parallel_cuda_manual_seed(3)
    assert ck.get_cuda_rng_tracker().get_states().keys() == {"model-parallel-rng"}
    ckpt = _run("reentrant")
    _assert_same(plain, ckpt)
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(7, 16, requires_grad=True)  # 112 elements: 56 per rank
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        y = ck.checkpoint(block, x, 1.0, "")[0]
    y.sum().backward()
    return sizes


def test_partition_activations_two_ranks():
    from tests.runtime._dist import run_ranks
    assert run_ranks(_partitioned, world_size=2) == [[56], [56]]
