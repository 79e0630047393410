"""The pipeline engine's monitoring, as the plain engine's (tests/runtime/test_monitor.py): a 2-stage
pipeline under the real launcher leaves the metrics folder with one row per train_batch, prints the
progress lines, logs its sends, receives and collectives (comms_logger) and times its phases
(wall_clock_breakdown); the hang watchdog names a stalled stage, not the stage waiting for it in a
receive."""
import csv
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from tests.runtime._dist import run_ranks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import dsrun
    from dsrun.pipe import LayerSpec, PipelineModule

    dsrun.init_distributed()
    torch.manual_seed(0)
    layers = [LayerSpec(torch.nn.Embedding, 16, 8), torch.nn.Tanh(), LayerSpec(torch.nn.Linear, 8, 8),
              LayerSpec(torch.nn.Linear, 8, 1)]
    model = PipelineModule(layers=layers, num_stages=2, loss_fn=torch.nn.MSELoss(), partition_method="uniform")
    engine, _, _, _ = dsrun.initialize(model=model, config=sys.argv[-1])
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 16, (2, 3), generator=g), torch.randn(2, 3, 1, generator=g)) for _ in range(8)]
    for step in range(4):
        loss = engine.train_batch(iter(data[2 * step:2 * step + 2]))
        if engine.global_rank == 0:
            print(f"train_batch {step + 1} returned {loss.item():.6g}", flush=True)
    engine.eval_batch(iter(data[:2]))  # not a step: no row
    engine.destroy()
""")


def test_two_stage_pipeline_leaves_the_metrics_folder_and_prints_progress(tmp_path):
    (tmp_path / "job.py").write_text(SCRIPT)
    cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 2,
           "optimizer": {"type": "SGD", "params": {"lr": 0.05}},
           "csv_monitor": {"enabled": True, "output_path": "csvmon", "job_name": "job"},
           "comms_logger": {"enabled": True}, "wall_clock_breakdown": True}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", "2", "job.py", "ds.json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    returned = [float(v) for v in re.findall(r"train_batch \d returned ([\d.e+-]+)", proc.stdout)]
    folder = tmp_path / "output" / "deepspeed_metrics"
    with open(folder / "training_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and [int(r["samples"]) for r in rows] == [4, 8, 12, 16]
    assert [float(r["loss"]) for r in rows] == [pytest.approx(v, rel=1e-5) for v in returned]
    assert all(float(r["grad_norm"]) > 0 and float(r["lr"]) == 0.05 and float(r["step_time_s"]) > 0 for r in rows)
    assert all(float(r[k]) > 0 for r in rows for k in ("forward_ms", "backward_ms", "optimizer_ms", "comm_ms"))
    step_s = [float(r["step_time_s"]) for r in rows]  # 2 micro-batches of 2 x 3 token ids a step
    assert [float(r["tokens_per_s"]) for r in rows] == [pytest.approx(12 / s, rel=1e-3) for s in step_s]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4 and summary["world_size"] == 2
    assert summary["data_parallel_size"] == 1 and (folder / "training_curves.png").exists()
    # rank 0 is stage 0: it sends activations, receives gradients, and joins the norm and loss reductions
    sizes = {(r["op"], r["bytes"]): r["count"] for r in summary["comms"]}
    activations = grads = 2 * 3 * 8 * 4  # bytes of one micro-batch's; 2 micro-batches a batch
    assert sizes[("send", activations)] == 2 * 4 + 2 and sizes[("recv", grads)] == 2 * 4, sizes  # eval_batch sends
    assert {"all_reduce", "broadcast"} <= {op for op, _ in sizes} and "comms_logger summary" in proc.stderr
    lines = [l.split(" | ")[0] for l in proc.stdout.splitlines() if "| loss " in l]
    assert lines == ["[rank 0] step 2", "[rank 0] step 4"], proc.stdout  # rank 0 only, every steps_per_print
    assert len((tmp_path / "csvmon" / "job" / "Train_Samples_train_loss.csv").read_text().splitlines()) == 5


TIMEOUT_S = 2.0
SLEEP_S = 7.0


def _stalled_stage(rank, world_size, outdir):
    import torch

    import dsrun
    from dsrun.pipe import PipelineModule

    stall = {"now": False}

    class MaybeSleep(torch.nn.Module):
        def forward(self, x):
            if stall["now"]:
                stall["now"] = False
                with open(os.path.join(outdir, "sleep_start"), "w") as f:
                    f.write(repr(time.time()))
                time.sleep(SLEEP_S)  # the stall: stage 1 waits for this activation in a receive
            return x

    torch.manual_seed(0)
    model = PipelineModule(layers=[torch.nn.Linear(4, 4), MaybeSleep(), torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)],
                           num_stages=2, loss_fn=torch.nn.MSELoss(), partition_method="uniform")
    cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 0,
           "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
           "hang_watchdog": {"timeout_s": TIMEOUT_S}, "metrics": {"output_path": outdir}}
    engine, _, _, _ = dsrun.initialize(model=model, config=cfg)
    data = [(torch.randn(2, 4), torch.randn(2, 1)) for _ in range(2)]
    for step in range(3):
        stall["now"] = rank == 0 and step == 1
        engine.train_batch(iter(data))
    steps = engine.global_steps
    engine.destroy()
    return steps


def test_watchdog_names_the_stalled_stage_not_the_one_waiting_in_a_receive(tmp_path):
    outdir = str(tmp_path / "metrics")
    os.makedirs(outdir)
    assert run_ranks(_stalled_stage, world_size=2, args=(outdir,), timeout=120) == [3, 3]  # it does not kill
    report_path = os.path.join(outdir, "hang_report.txt")
    report = open(report_path).read()
    assert "ranks behind: 0 (the others wait for them in a point-to-point receive)" in report, report
    assert "time.sleep(SLEEP_S)" in report.split("rank 0 (", 1)[1].split("rank 1 (", 1)[0], report
    waiting = report.split("rank 1 (", 1)[1].splitlines()[0]
    assert "in recv activations (micro-batch 0) from rank 0" in waiting, report
    delay = os.path.getmtime(report_path) - float(open(os.path.join(outdir, "sleep_start")).read())
    assert TIMEOUT_S < delay < SLEEP_S, f"report {delay:.1f} s after the stall began"
    assert report.count("[dsrun hang watchdog]") == 1


def test_report_across_stages_names_the_rank_waited_on_and_compares_steps_only():
    from dsrun.runtime.monitor.watchdog import format_report
    stage = {"steps": 3, "backwards": 3, "phase": "forward (micro-batch 0)", "busy_s": 301.0, "stack": "  s",
             "steps_only": True}
    waits = dict(stage, phase="recv activations (micro-batch 0) from rank 1", waiting_on=1, collectives=12)
    text = format_report({0: dict(stage, collectives=9), 1: dict(stage, collectives=12), 2: waits}, timeout_s=300)
    assert "ranks behind: 1 (the others wait for them in a point-to-point receive)" in text, text
    # a collective stall: middle stages issue more transfers a step than end stages; steps alone compare
    text = format_report({0: dict(stage, collectives=9), 1: dict(stage, collectives=18)}, timeout_s=300)
    assert "ranks behind: none" in text, text
