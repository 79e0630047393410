"""Runs end cleanly: nothing of torch.distributed outlives the interpreter (issue 10, defect 1).

[Note: teardown at exit] in runtime/teardown.py explains the abort ("terminate called without an
active exception") that a gloo thread still alive at finalisation caused. The check here is exact
rather than statistical: a script registers its own atexit handler *before* dsrun's (so it runs after
dsrun's teardown) and records how many threads its process still has; it must be the count it had
before torch.distributed started. The script never calls `engine.destroy()` or
`destroy_process_group()`, and ZeRO-2 with `overlap_comm` leaves all-gathers in flight after `step()`.
"""
import json

import pytest

from tests.trust._job import run_job

BODY = """
import atexit, json
import torch.distributed  # starts one thread of its own at import, before any group exists
def threads():
    return len(os.listdir("/proc/self/task"))
torch.set_num_threads(1)
before = threads()
def report():
    with open(f"threads-{os.environ['RANK']}.json", "w") as f:
        json.dump({"before": before, "at_exit": threads(), "names": [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]}, f)
atexit.register(report)
engine, *_ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
for _ in range(3):
    loss = engine(torch.randn(4, 8)).pow(2).mean()
    engine.backward(loss)
    engine.step()
"""

STAGES = {
    "zero0": {"stage": 0},
    "zero2_overlap": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_no_distributed_thread_survives_to_finalisation(tmp_path, name):
    config = {"train_batch_size": 8, "zero_optimization": STAGES[name],
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
    proc = run_job(tmp_path, BODY, config=config)
    assert proc.returncode == 0, proc.stderr
    assert "terminate called" not in proc.stderr
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"threads-{rank}.json").read_text())
        assert counts["at_exit"] == counts["before"], (rank, counts)


def test_uncaught_exception_exits_1_without_waiting(tmp_path):
    """A rank that dies of an exception while its peer waits in a collective leaves at once with 1."""
    body = """
engine, *_ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
loss = engine(torch.randn(4, 8)).pow(2).mean()
engine.backward(loss)
engine.step()   # ZeRO-1: all-gathers in flight
if engine.global_rank == 0:
    raise ValueError("rank zero gives up")
import time; time.sleep(60)
"""
    proc = run_job(tmp_path, body, launcher_args=("--grace_period", "2"))
    assert proc.returncode == 1, proc.stderr
    assert "ValueError: rank zero gives up" in proc.stderr
    assert "terminate called" not in proc.stderr and "SIGABRT" not in proc.stderr
