"""The hang watchdog on real gloo ranks: a rank made to sleep in the middle of a step is named, with its
stack, within the limit, and nobody is killed."""
import os
import time

from tests.runtime._dist import run_ranks

TIMEOUT_S = 2.0
SLEEP_S = 7.0


def _sleepy(rank, world_size, outdir):
    import torch

    import dsrun
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    cfg = {"train_batch_size": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "steps_per_print": 0,
           "hang_watchdog": {"timeout_s": TIMEOUT_S}, "metrics": {"output_path": outdir}}
    engine, _, _, _ = dsrun.initialize(model=model, config=cfg)
    for step in range(4):
        loss = engine(torch.randn(2, 8)).pow(2).mean()
        if rank == 1 and step == 2:
            with open(os.path.join(outdir, "sleep_start"), "w") as f:
                f.write(repr(time.time()))
            time.sleep(SLEEP_S)  # the stall: rank 0 waits for this rank in the gradient all-reduce
        engine.backward(loss)
        engine.step()
    steps = engine.global_steps
    engine.destroy()
    return steps


def test_watchdog_names_the_sleeping_rank_with_its_stack(tmp_path):
    outdir = str(tmp_path / "metrics")
    os.makedirs(outdir)
    steps = run_ranks(_sleepy, world_size=2, args=(outdir,), timeout=120)
    assert steps == [4, 4]  # it reports; it does not kill
    report_path = os.path.join(outdir, "hang_report.txt")
    report = open(report_path).read()
    assert "ranks behind: 1 " in report, report
    behind = report.split("rank 1 (", 1)[1]
    assert "in forward" in behind.splitlines()[0] or "in backward" not in behind.splitlines()[0], report
    assert "_sleepy" in behind and "time.sleep(SLEEP_S)" in behind, report  # rank 1's own stack
    rank0 = report.split("rank 0 (", 1)[1]
    assert "last collective: all_reduce" in rank0.splitlines()[0], report
    started = float(open(os.path.join(outdir, "sleep_start")).read())
    delay = os.path.getmtime(report_path) - started
    assert TIMEOUT_S < delay < SLEEP_S, f"report {delay:.1f} s after the stall began"
    assert report.count("[dsrun hang watchdog]") == 1


def test_report_when_every_rank_waits_at_the_same_point():
    from dsrun.runtime.monitor.watchdog import format_report
    same = {"steps": 3, "backwards": 6, "collectives": 9, "phase": "backward", "busy_s": 301.0, "stack": "  stack"}
    text = format_report({0: dict(same), 1: dict(same), 2: None}, timeout_s=300)
    assert "ranks behind: none" in text and "did not answer (stuck holding the GIL, or dead): 2" in text


def _watchdog(rank, store, busy_for, out):
    from dsrun.runtime.monitor.watchdog import HangWatchdog
    state = {"steps": 3, "backwards": 6 + rank, "collectives": 9, "phase": "backward",
             "busy_since": time.time() - busy_for, "last": {}}
    wd = HangWatchdog(timeout_s=0.2, rank=rank, world_size=2, state=state, store=store, write=out.append)
    wd.prefix = "test/"  # both objects of this test speak under one prefix, as two processes would
    return wd


def test_protocol_over_a_real_store():
    """Rank 1 stalls and triggers; rank 0 (not stalled itself) answers and prints once, naming rank 0 as
    behind (fewer backward calls); rank 1 then stays quiet."""
    import torch.distributed as dist
    store = dist.HashStore()
    out0, out1 = [], []
    rank0, rank1 = _watchdog(0, store, 0.0, out0), _watchdog(1, store, 10.0, out1)
    rank1._tick()
    assert int(store.get("test/trigger")) == 1 and store.check(["test/report/1"])
    rank0._tick()
    assert len(out0) == 1 and "reports from 2/2 ranks" in out0[0] and "ranks behind: 0 " in out0[0]
    rank0._tick()
    assert len(out0) == 1  # once per stall
    for wd in (rank0, rank1):  # the stall ends: a step completes, both ranks are between steps
        wd.state.update(steps=4, busy_since=None)
    rank0._tick()
    assert len(out0) == 1  # a stall that is over is not reported again at the next step (was: printed twice)
    time.sleep(4 * rank1.poll_s + 1.1)
    rank1._tick()
    assert out1 == []  # rank 0 printed


def test_a_rank_prints_its_own_view_when_rank_0_never_does():
    import torch.distributed as dist
    store = dist.HashStore()
    out1 = []
    rank1 = _watchdog(1, store, 10.0, out1)
    rank1._tick()
    assert out1 == []
    time.sleep(4 * rank1.poll_s + 1.1)
    rank1._tick()
    assert len(out1) == 1 and out1[0].startswith("rank 0 did not report") and "rank 1 (" in out1[0]
    assert "test_monitor_watchdog.py" in out1[0]  # this thread is the main thread here: its stack is shown
