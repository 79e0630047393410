"""Checkpoints through the real engine on gloo ranks: save at 1 rank -> load at 2 and back, ZeRO stage
changes, exact resume (fp32 losses bit-identical to an uninterrupted run), tag validation across ranks,
and the fp32 converter against the live parameters."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _dist import run_ranks  # noqa: E402

MICRO, GAS, LR = 2, 2, 0.05
pytestmark = pytest.mark.slow


def _config(stage, world):
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
            "train_batch_size": MICRO * GAS * world, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": LR}},
            "zero_optimization": {"stage": stage}}


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


def _data(steps, start=0):
    g = torch.Generator().manual_seed(7)
    rows = MICRO * GAS * 2  # the global batch of a 2-rank run; a 1-rank run gets it all per step
    data = [(torch.randn(rows, 6, generator=g), torch.randn(rows, 3, generator=g)) for _ in range(start + steps)]
    return data[start:]


def _engine(stage, world, seed=0):
    import dsrun
    engine, _, _, _ = dsrun.initialize(model=_model(seed), config=_config(stage, world))
    return engine


def _train(engine, rank, world, steps, start=0):
    losses = []
    for x, y in _data(steps, start):
        per_rank = x.shape[0] // world
        xs, ys = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        for m in range(GAS):
            rows = slice(m * (per_rank // GAS), (m + 1) * (per_rank // GAS))
            loss = torch.nn.functional.mse_loss(engine(xs[rows]), ys[rows])
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    return losses


def _state(engine):
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _save_one_rank(rank, world, root):
    engine = _engine(stage=0, world=world)
    _train(engine, rank, world, 3)
    engine.save_checkpoint(root, client_state={"from": "one"})
    return _state(engine), _train(engine, rank, world, 3, start=3)


def _two_ranks(rank, world, root, one_rank_dir):
    from dsrun.runtime.checkpoint import CheckpointError
    out = {}
    # 1 -> 2 ranks, ZeRO-0 -> ZeRO-2: weights come back exactly, training continues
    engine = _engine(stage=2, world=world, seed=5)
    path, client = engine.load_checkpoint(one_rank_dir)
    out["from_one"] = (_state(engine), client, engine.global_steps, engine.lr_scheduler.state_dict())
    out["from_one_losses"] = _train(engine, rank, world, 3, start=3)
    for stage in (1, 2):
        engine = _engine(stage=stage, world=world)
        _train(engine, rank, world, 3)
        save_dir = os.path.join(root, f"stage{stage}")
        engine.save_checkpoint(save_dir)
        out[f"saved{stage}"] = _state(engine)
        out[f"uninterrupted{stage}"] = _train(engine, rank, world, 3, start=3)
        resumed = _engine(stage=stage, world=world, seed=9)
        resumed.load_checkpoint(save_dir)
        out[f"resumed{stage}"] = _train(resumed, rank, world, 3, start=3)
    # stage change at the same world size: ZeRO-1 checkpoint into a ZeRO-2 engine
    changed = _engine(stage=2, world=world, seed=9)
    changed.load_checkpoint(os.path.join(root, "stage1"))
    out["stage_change"] = _train(changed, rank, world, 3, start=3)
    # tag validation: per-rank tags
    engine = _engine(stage=1, world=world)
    engine.save_checkpoint(os.path.join(root, "tags"), tag=f"rank{rank}", save_latest=False)
    out["warn_tags"] = sorted(os.listdir(os.path.join(root, "tags")))
    # per-rank save directories (a script naming its folder after each rank's clock): rank 0's, whole
    engine.save_checkpoint(os.path.join(root, f"dir_of_rank{rank}"), tag="t")
    out["dirs"] = sorted(d for d in os.listdir(root) if d.startswith("dir_of_rank"))
    if out["dirs"] == ["dir_of_rank0"]:
        engine.load_checkpoint(os.path.join(root, "dir_of_rank0"), tag="t")
    from dsrun.runtime.checkpoint import engine_io
    engine_io._tag_validation_mode = lambda e: "fail"
    try:
        engine.save_checkpoint(os.path.join(root, "tags_fail"), tag=f"rank{rank}")
        out["fail"] = None
    except CheckpointError as err:
        out["fail"] = str(err)
    return out


def _one_rank_load(rank, world, root):
    out = {}
    for stage in (1, 2):
        engine = _engine(stage=0 if stage == 1 else 1, world=world, seed=3)
        engine.load_checkpoint(os.path.join(root, f"stage{stage}"))
        out[stage] = (_state(engine), _train(engine, rank, world, 3, start=3))
    return out


def _per_step(*rank_losses):
    """Mean loss per optimizer step over micro-batches and ranks (the global-batch loss)."""
    merged = [sum(values) / len(values) for values in zip(*rank_losses)]
    return [sum(merged[i:i + GAS]) / GAS for i in range(0, len(merged), GAS)]


def _assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_across_world_sizes_and_stages(tmp_path):
    one_dir = str(tmp_path / "one")
    [(one_state, one_continued)] = run_ranks(_save_one_rank, world_size=1, args=(one_dir,))
    two = run_ranks(_two_ranks, world_size=2, args=(str(tmp_path), one_dir))

    for r in range(2):
        state, client, steps, sched = two[r]["from_one"]
        _assert_states_equal(state, one_state)
        assert client == {"from": "one"} and steps == 3 and sched == {"last_batch_iteration": 2}
        for stage in (1, 2):
            assert two[r][f"resumed{stage}"] == two[r][f"uninterrupted{stage}"]  # bit-identical fp32 resume
        torch.testing.assert_close(two[r]["stage_change"], two[r]["uninterrupted1"], rtol=1e-5, atol=1e-6)
    _assert_states_equal(two[0]["saved1"], two[1]["saved1"])
    # the 2-rank run continues the 1-rank run's training (same global batches, other reduction order)
    torch.testing.assert_close(_per_step(two[0]["from_one_losses"], two[1]["from_one_losses"]),
                               _per_step(one_continued), rtol=1e-5, atol=1e-6)

    assert two[0]["warn_tags"] == ["rank0", "zero_to_fp32.py"]  # Warn: everyone saves under rank 0's tag
    assert two[0]["dirs"] == two[1]["dirs"] == ["dir_of_rank0"]  # and under rank 0's save directory
    for r in range(2):
        assert two[r]["fail"] is not None and "not the same on all ranks" in two[r]["fail"]

    # 2 -> 1 rank (ZeRO-1 -> 0, ZeRO-2 -> 1): weights exact, continued losses track the 2-rank run
    [one] = run_ranks(_one_rank_load, world_size=1, args=(str(tmp_path),))
    for stage in (1, 2):
        state, losses = one[stage]
        _assert_states_equal(state, two[0][f"saved{stage}"])
        torch.testing.assert_close(_per_step(losses),
                                   _per_step(two[0][f"uninterrupted{stage}"], two[1][f"uninterrupted{stage}"]),
                                   rtol=1e-5, atol=1e-6)

    # the converter reproduces the live parameters of the 2-rank ZeRO-2 run exactly
    from dsrun.runtime.checkpoint.to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    sd = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "stage2"))
    _assert_states_equal(sd, two[0]["saved2"])
