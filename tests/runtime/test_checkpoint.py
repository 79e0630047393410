"""Checkpoint format tests against a stand-in engine (tests/runtime/_fake_ckpt_engine.py): round trips,
`latest` handling, atomicity, frozen parameters, mid-accumulation, load_module_only, the fp32 converter."""
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dsrun.errors import ConfigError
from dsrun.runtime.checkpoint import CheckpointError, engine_io, layout, shard_io, to_fp32

sys.path.insert(0, os.path.dirname(__file__))
from _fake_ckpt_engine import FakeEngine  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self, tie=False, freeze=False):
        super().__init__()
        self.emb = torch.nn.Linear(4, 7)
        self.mid = torch.nn.Linear(7, 7)
        self.out = torch.nn.Linear(7, 4, bias=False)
        self.register_buffer("scale", torch.tensor([1.5]))
        if tie:
            self.head = self.out  # a tied alias: the same weight under two state-dict names
        if freeze:
            self.mid.requires_grad_(False)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.emb(x))))) * self.scale


def _engine(seed=0, **kw):
    torch.manual_seed(seed)
    net_kw = {k: kw.pop(k) for k in ("tie", "freeze") if k in kw}
    return FakeEngine(Net(**net_kw), **kw)


def _batches(n, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=g) for _ in range(n)]


def _params(engine):
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def test_round_trip_and_exact_resume(tmp_path):
    data = _batches(10)
    a = _engine()
    for x in data[:4]:
        a.train_micro_step(x)
    assert engine_io.save(a, tmp_path, client_state={"epoch": 3})
    assert (tmp_path / "latest").read_text() == "global_step4"
    tag_dir = tmp_path / "global_step4"
    assert sorted(os.listdir(tag_dir)) == ["checkpoint.json", "mp_rank_00_model_states.pt", "zero_shard_rank0.pt"]

    b = _engine(seed=99)
    path, client = engine_io.load(b, tmp_path)
    assert path == str(tag_dir / "mp_rank_00_model_states.pt") and client == {"epoch": 3}
    for k, v in _params(a).items():
        assert torch.equal(v, b.module.state_dict()[k]), k
    assert (b.global_steps, b.global_samples) == (a.global_steps, a.global_samples)
    assert b.lr_scheduler.state_dict() == a.lr_scheduler.state_dict()
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]
    for pa, pb in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(a.optimizer.state[pa]["momentum_buffer"], b.optimizer.state[pb]["momentum_buffer"])
    # the resumed run continues exactly as the uninterrupted one
    assert [a.train_micro_step(x) for x in data[4:]] == [b.train_micro_step(x) for x in data[4:]]


def test_saved_tensors_are_clones(tmp_path):
    a = _engine()
    a.train_micro_step(_batches(1)[0])
    engine_io.save(a, tmp_path, tag="t")
    payload = torch.load(tmp_path / "t" / "zero_shard_rank0.pt", weights_only=True)
    entry = payload["entries"]["emb.weight"][0]
    assert entry["master"].untyped_storage().nbytes() == 28 * 4  # just the slice, not a flat buffer


def test_save_right_after_init_then_load_trained_engine(tmp_path):
    fresh = _engine()
    engine_io.save(fresh, tmp_path, tag="init")
    trained = _engine()
    for x in _batches(2):
        trained.train_micro_step(x)
    engine_io.load(trained, tmp_path, tag="init")
    for k, v in _params(fresh).items():
        assert torch.equal(v, trained.module.state_dict()[k])
    assert trained.global_steps == 0


def test_latest_missing_returns_none(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert engine_io.load(_engine(), tmp_path) == (None, None)
    assert "latest" in caplog.text


@pytest.mark.parametrize("bad", [None, ""])
def test_empty_save_dir_is_value_error(bad):
    with pytest.raises(ValueError) as err:
        engine_io.save(_engine(), bad)
    assert isinstance(err.value, ConfigError)
    with pytest.raises(ValueError):
        engine_io.load(_engine(), bad)


def test_explicit_tag_and_save_latest_false(tmp_path):
    e = _engine()
    engine_io.save(e, tmp_path, tag="first")
    engine_io.save(e, tmp_path, tag="second", save_latest=False)
    assert layout.read_latest(tmp_path) == "first"
    assert engine_io.load(_engine(), tmp_path, tag="second")[0].endswith("second/mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="no checkpoint tag .third. in .*; tags present: first, second"):
        engine_io.load(_engine(), tmp_path, tag="third")
    with pytest.raises(CheckpointError, match="invalid checkpoint tag"):
        engine_io.save(e, tmp_path, tag="a/b")


def test_overwriting_a_tag_replaces_it(tmp_path):
    e = _engine()
    engine_io.save(e, tmp_path, tag="t")
    e.train_micro_step(_batches(1)[0])
    engine_io.save(e, tmp_path, tag="t")
    assert sorted(os.listdir(tmp_path)) == ["latest", "t", "zero_to_fp32.py"]
    b = _engine(seed=5)
    engine_io.load(b, tmp_path)
    assert b.global_steps == 1


def test_failure_before_publish_keeps_previous_checkpoint(tmp_path, monkeypatch):
    e = _engine()
    engine_io.save(e, tmp_path)  # global_step0
    e.train_micro_step(_batches(1)[0])

    def boom(*a, **k):
        raise OSError("disk full")
    from dsrun.runtime.checkpoint import save_folder
    monkeypatch.setattr(save_folder, "publish_dir", boom)
    with pytest.raises(CheckpointError, match="disk full"):
        engine_io.save(e, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["global_step0", "latest", "zero_to_fp32.py"]  # temp folder cleaned up
    assert layout.read_latest(tmp_path) == "global_step0"
    assert engine_io.load(_engine(), tmp_path)[0] is not None


def test_failure_before_latest_keeps_previous_latest(tmp_path, monkeypatch):
    e = _engine()
    engine_io.save(e, tmp_path)
    e.train_micro_step(_batches(1)[0])
    monkeypatch.setattr(layout, "write_latest", lambda *a: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(CheckpointError):
        engine_io.save(e, tmp_path)
    assert layout.read_latest(tmp_path) == "global_step0"
    b = _engine(seed=3)
    engine_io.load(b, tmp_path)
    assert b.global_steps == 0


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from test_checkpoint import _engine, _batches
    from dsrun.runtime.checkpoint import engine_io, atomic, save_folder
    e = _engine()
    engine_io.save(e, {root!r})
    e.train_micro_step(_batches(1)[0])
    point = {point!r}
    if point == "publish":
        save_folder.publish_dir = lambda *a: os._exit(17)
    elif point == "latest":
        engine_io.layout.write_latest = lambda *a: os._exit(17)
    elif point == "rename":  # overwrite of the same tag: crash after moving the old copy aside
        real = os.rename
        calls = []
        def rename(src, dst):
            real(src, dst)
            calls.append(dst)
            if ".old-" in dst:
                os._exit(17)
        os.rename = rename
        engine_io.save(e, {root!r}, tag="global_step0")
    engine_io.save(e, {root!r})
""")


@pytest.mark.parametrize("point", ["publish", "latest", "rename"])
def test_hard_crash_mid_save_leaves_previous_checkpoint_loadable(tmp_path, point):
    root = str(tmp_path / "ckpt")
    script = CRASH_SCRIPT.format(tests=os.path.dirname(__file__), root=root, point=point)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    assert layout.read_latest(root) == "global_step0"
    b = _engine(seed=7)
    path, _ = engine_io.load(b, root)
    assert path is not None and b.global_steps == 0
    for k, v in _params(_engine()).items():
        assert torch.equal(v, b.module.state_dict()[k])
    # the next save of that tag removes the crashed save's temp folder and succeeds
    engine_io.save(_engine(), root, tag="global_step0")
    engine_io.save(_engine(), root, tag="global_step1")
    assert not [n for n in os.listdir(root) if ".tmp-" in n]


def test_incomplete_checkpoint_is_reported(tmp_path):
    engine_io.save(_engine(), tmp_path, tag="t")
    os.remove(tmp_path / "t" / "zero_shard_rank0.pt")
    with pytest.raises(CheckpointError, match="missing zero_shard_rank0.pt"):
        engine_io.load(_engine(), tmp_path)


def test_shape_mismatch_names_parameter_and_topology(tmp_path):
    engine_io.save(_engine(), tmp_path, tag="t")
    net = Net()
    net.mid = torch.nn.Linear(7, 5)  # same names, other shapes
    other = FakeEngine(net)
    with pytest.raises(CheckpointError) as err:
        engine_io.load(other, tmp_path, load_module_strict=False)
    assert "mid.weight" in str(err.value) and "world_size=1" in str(err.value)


def test_frozen_parameters_kept_and_excluded(tmp_path):
    a = _engine(freeze=True)
    for x in _batches(2):
        a.train_micro_step(x)
    engine_io.save(a, tmp_path, tag="with")
    engine_io.save(a, tmp_path, tag="without", exclude_frozen_parameters=True)
    with_m = json.loads((tmp_path / "with" / "checkpoint.json").read_text())
    without_m = json.loads((tmp_path / "without" / "checkpoint.json").read_text())
    assert with_m["params"]["mid.weight"]["frozen"] is True
    assert "mid.weight" not in without_m["params"]

    b = _engine(seed=42, freeze=True)
    engine_io.load(b, tmp_path, tag="with")
    assert torch.equal(b.module.mid.weight, a.module.mid.weight)  # frozen weights survive
    c = _engine(seed=42, freeze=True)
    keep = c.module.mid.weight.detach().clone()
    engine_io.load(c, tmp_path, tag="without")
    assert torch.equal(c.module.mid.weight, keep)  # excluded: the live frozen weights stay
    assert torch.equal(c.module.emb.weight, a.module.emb.weight)
    sd = to_fp32.get_fp32_state_dict_from_zero_checkpoint(tmp_path, tag="without")
    assert "mid.weight" not in sd and "emb.weight" in sd


def test_mid_accumulation_save(tmp_path, caplog):
    a = _engine(gas=2)
    data = _batches(5)
    for x in data:
        a.train_micro_step(x)
    engine_io.save(a, tmp_path)
    assert json.loads((tmp_path / "global_step2" / "checkpoint.json").read_text())["mid_accumulation"]
    engine_io.save_16bit_model(a, tmp_path / "hf")
    assert set(torch.load(tmp_path / "hf" / "pytorch_model.bin")) == set(a.module.state_dict())
    b = _engine(seed=1, gas=2)
    with caplog.at_level(logging.WARNING):
        engine_io.load(b, tmp_path)
    assert "accumulation" in caplog.text
    assert b.global_steps == 2 and b.micro_steps == 4  # window restarts: 5 rounded down to 2 * gas


def test_load_module_only(tmp_path):
    a = _engine()
    for x in _batches(3):
        a.train_micro_step(x)
    engine_io.save(a, tmp_path)
    b = _engine(seed=8)
    b.train_micro_step(_batches(1, seed=5)[0])
    momentum_before = [b.optimizer.state[p]["momentum_buffer"].clone() for p in b.module.parameters()]
    engine_io.load(b, tmp_path, load_module_only=True)
    for k, v in _params(a).items():
        assert torch.equal(v, b.module.state_dict()[k])
    assert b.global_steps == 1 and b.lr_scheduler.last_batch_iteration == 0
    for p, before in zip(b.module.parameters(), momentum_before):
        assert torch.equal(b.optimizer.state[p]["momentum_buffer"], before)


def test_load_without_optimizer_or_scheduler_states(tmp_path):
    a = _engine()
    for x in _batches(3):
        a.train_micro_step(x)
    engine_io.save(a, tmp_path)
    b = _engine(seed=8)
    engine_io.load(b, tmp_path, load_optimizer_states=False, load_lr_scheduler_states=False)
    assert torch.equal(b.module.emb.weight, a.module.emb.weight)
    assert not b.optimizer.state  # untouched: still empty
    assert b.lr_scheduler.last_batch_iteration == -1
    assert b.global_steps == 3


def test_custom_load_fn_and_non_strict(tmp_path):
    engine_io.save(_engine(), tmp_path)
    seen = {}
    engine_io.load(_engine(seed=2), tmp_path, custom_load_fn=lambda src, dst: seen.update(src=src, dst=dst))
    assert "emb.weight" in seen["src"]


def test_converter_matches_live_params_and_handles_ties(tmp_path):
    a = _engine(tie=True)
    for x in _batches(3):
        a.train_micro_step(x)
    engine_io.save(a, tmp_path)
    sd = to_fp32.get_fp32_state_dict_from_zero_checkpoint(tmp_path)
    live = a.module.state_dict()
    assert list(sd) == list(live)
    for k, v in live.items():
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v.float()), k
    assert sd["head.weight"] is sd["out.weight"]
    net = Net(tie=True)
    net.load_state_dict(sd)

    out = tmp_path / "fp32.bin"
    assert to_fp32.main([str(tmp_path), str(out)]) == 0
    loaded = torch.load(out)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert to_fp32.main([str(tmp_path / "nope"), str(out)]) != 0


def test_converter_streams_with_mmap(tmp_path, monkeypatch):
    engine_io.save(_engine(), tmp_path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", spy)
    stream = to_fp32.iter_fp32_tensors(tmp_path)
    first_name, first = next(stream)  # a generator: one tensor at a time
    rest = dict(stream)
    assert first_name == "scale" and rest["emb.weight"].shape == (7, 4)
    assert calls and all(calls)  # every file opened with mmap=True


def test_shard_reader_stitches_ranges(tmp_path):
    # Hand-built: two files each holding part of one tensor; read any range across the boundary.
    full = torch.arange(10, dtype=torch.float32)
    manifest = {"params": {"w": {"shape": [10], "numel": 10}},
                "shards": {"a.pt": {"w": [[0, 3], [7, 10]]}, "b.pt": {"w": [[3, 7]]}}}
    torch.save({"entries": {"w": [{"start": 0, "end": 3, "master": full[0:3].clone(), "optim": {}},
                                  {"start": 7, "end": 10, "master": full[7:].clone(), "optim": {}}]}},
               tmp_path / "a.pt")
    torch.save({"entries": {"w": [{"start": 3, "end": 7, "master": full[3:7].clone(), "optim": {}}]}},
               tmp_path / "b.pt")
    reader = shard_io.ShardReader(str(tmp_path), manifest)
    for s, e in [(0, 10), (2, 8), (3, 7), (5, 6), (6, 9), (4, 4)]:
        assert torch.equal(reader.read("w", "master", s, e), full[s:e])
    with pytest.raises(KeyError):
        reader.read("w", "exp_avg", 0, 2)
    with pytest.raises(KeyError):
        reader.read("v", "master", 0, 2)


def test_ownership_plan_dedups_replicas_and_checks_coverage():
    replicated = [{"w": [(0, 10)]}, {"w": [(0, 10)]}]
    assert shard_io.plan_ownership(replicated) == [{"w": [(0, 10)]}, {}]
    split = [{"w": [(0, 5)]}, {"w": [(5, 10)]}]
    assert shard_io.plan_ownership(split) == split
    overlap = shard_io.plan_ownership([{"w": [(0, 6)]}, {"w": [(4, 10)]}])
    assert overlap == [{"w": [(0, 6)]}, {"w": [(6, 10)]}]
    shard_io.check_coverage(overlap, {"w": 10})
    with pytest.raises(CheckpointError, match="held by no rank"):
        shard_io.check_coverage([{"w": [(0, 4)]}, {"w": [(5, 10)]}], {"w": 10})
