"""What a run shows and leaves: the metrics folder, the progress output, monitors, comms_logger and the
config keys, through the real launcher and real gloo ranks."""
import csv
import io
import json
import os
import re
import struct
import subprocess
import sys

import pytest

from dsrun.errors import ConfigError
from dsrun.runtime.config import load_config
from tests.runtime._dist import run_ranks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The README's main job, shortened (10 optimizer steps), run by the real launcher in a fresh cwd."""
    cwd = tmp_path_factory.mktemp("job")
    cfg = json.load(open(os.path.join(REPO, "examples", "ds_config.json")))
    cfg.update(steps_per_print=5, gradient_clipping="auto",
               csv_monitor={"enabled": True, "output_path": "csvmon", "job_name": "job"},
               comms_logger={"enabled": True})
    (cwd / "ds.json").write_text(json.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", "2",
                           os.path.join(REPO, "examples", "train.py"), "--deepspeed_config", "ds.json",
                           "--epochs", "1", "--num_samples", "320"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cwd, proc


def test_launched_job_leaves_the_metrics_folder(launched):
    cwd, _ = launched
    folder = cwd / "output" / "deepspeed_metrics"
    rows = _read_csv(folder / "training_metrics.csv")
    assert list(rows[0]) == ["step", "loss", "lr", "grad_norm", "loss_scale", "skipped", "samples", "samples_per_s",
                             "tokens_per_s", "tflops", "step_time_s", "memory_gib"]
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    assert [int(r["samples"]) for r in rows] == [32 * s for s in range(1, 11)]
    assert all(float(r["loss"]) > 0 and float(r["grad_norm"]) > 0 and float(r["samples_per_s"]) > 0 for r in rows)
    assert float(rows[0]["lr"]) == 0.0 and float(rows[5]["lr"]) == pytest.approx(0.003, rel=0.05)  # warm-up
    assert all(r["tokens_per_s"] == "" for r in rows)  # float inputs: no token dimension
    assert _png_size(folder / "training_curves.png")[0] >= 600 and _png_size(folder / "training_curves.png")[1] >= 300
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 10 and summary["samples"] == 320
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2 and summary["precision"] == "fp32"
    assert summary["final_loss"] == pytest.approx(float(rows[-1]["loss"]), rel=1e-5)
    assert summary["best_loss"] == pytest.approx(min(float(r["loss"]) for r in rows), rel=1e-5)
    assert summary["versions"]["dsrun"] and summary["versions"]["torch"] and summary["peak_memory_gib"] > 0
    assert re.fullmatch(r"[0-9a-f]{64}", summary["config_sha256"]) and summary["timings"]["train_s"] > 0
    resolved = json.loads((folder / "deepspeed_config_auto.json").read_text())
    assert resolved["pipeline"].pop("stages") == "auto"  # a real value (stages come from PipelineModule)
    assert '"auto"' not in json.dumps(resolved) and resolved["gradient_clipping"] == 1.0
    assert resolved["train_micro_batch_size_per_gpu"] == 8 and resolved["metrics"]["enabled"] is True
    resolved["pipeline"]["stages"] = "auto"
    assert load_config(resolved, world_size=2).fingerprint() == summary["config_sha256"]


def test_launched_job_prints_plain_progress_lines(launched):
    _, proc = launched
    lines = [l for l in proc.stdout.splitlines() if "| loss " in l]
    assert [l.split(" | ")[0] for l in lines] == ["[rank 0] step 5/192", "[rank 0] step 10/192"]
    assert "samples/s" in lines[0] and "lr " in lines[0] and "ETA" in lines[0]
    assert not CONTROL.search(proc.stdout), repr(proc.stdout)


def test_launched_job_feeds_csv_monitor_and_comms_logger(launched):
    cwd, proc = launched
    lr = (cwd / "csvmon" / "job" / "Train_Samples_lr.csv").read_text().splitlines()
    assert lr[0] == "step,lr" and len(lr) == 11 and lr[1].startswith("32,")
    assert (cwd / "csvmon" / "job" / "Train_Samples_train_loss.csv").exists()
    summary = json.loads((cwd / "output" / "deepspeed_metrics" / "summary.json").read_text())
    ops = {r["op"] for r in summary["comms"]}
    assert ops and all(r["count"] > 0 and r["busbw_gbs"] >= 0 for r in summary["comms"])
    assert "comms_logger summary" in proc.stderr and all(op in proc.stderr for op in ops)


def _token_job(rank, world_size, outdir, extra):
    import torch

    import dsrun

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.out = torch.nn.Linear(16, 50)

        def forward(self, ids):
            return torch.nn.functional.cross_entropy(self.out(self.emb(ids)).flatten(0, 1), ids.flatten())

    torch.manual_seed(0)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "metrics": {"output_path": outdir}, **extra}
    engine, _, _, _ = dsrun.initialize(model=LM(), config=cfg)
    for _ in range(6):
        engine.backward(engine(torch.randint(0, 50, (2, 12))))
        engine.step()
    engine.destroy()
    return engine.global_steps


def test_tokens_flops_and_wall_clock_breakdown(tmp_path):
    outdir = str(tmp_path / "m")
    run_ranks(_token_job, world_size=1, args=(outdir, {"wall_clock_breakdown": True,
                                                       "metrics": {"output_path": outdir, "flops_per_sample": 1e9}}))
    rows = _read_csv(os.path.join(outdir, "training_metrics.csv"))
    assert len(rows) == 3 and {"forward_ms", "backward_ms", "optimizer_ms", "comm_ms"} <= set(rows[0])
    for r in rows:
        step_s = float(r["step_time_s"])
        assert float(r["tokens_per_s"]) == pytest.approx(4 * 12 / step_s, rel=1e-3)  # 2 x 2 samples of 12 tokens
        assert float(r["tflops"]) == pytest.approx(4 * 1e9 / step_s / 1e12, rel=1e-3)
        assert float(r["forward_ms"]) > 0 and float(r["backward_ms"]) > 0


def test_metrics_disabled_leaves_nothing(tmp_path):
    outdir = str(tmp_path / "m")
    run_ranks(_token_job, world_size=1, args=(outdir, {"metrics": {"enabled": False, "output_path": outdir},
                                                       "hang_watchdog": {"enabled": False}}))
    assert not os.path.exists(outdir)


def test_non_terminal_progress_is_plain_lines_every_steps_per_print():
    from dsrun.runtime.monitor.progress import Progress
    out = io.StringIO()
    progress = Progress(steps_per_print=2, total_steps=4, stream=out, terminal=False)
    for step in range(1, 5):
        progress.show({"step": step, "loss": 1.0 / step, "lr": 1e-3, "samples_per_s": 1234.5, "tokens_per_s": 5e4,
                       "tflops": 0.5, "mfu": 0.25, "memory_gib": 1.5, "skipped": 0, "forward_ms": 3.0}, eta_s=61)
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "step 2/4 | loss 0.5000 | lr 1.000e-03 | samples/s 1.23k | tokens/s 50.00k | FLOP/s 500.00G | MFU 25.0% | "
        "mem 1.50 GiB | skipped 0 | fwd 3.0 ms | ETA 0:01:01",
        "step 4/4 | loss 0.2500 | lr 1.000e-03 | samples/s 1.23k | tokens/s 50.00k | FLOP/s 500.00G | MFU 25.0% | "
        "mem 1.50 GiB | skipped 0 | fwd 3.0 ms | ETA 0:01:01"]
    assert not CONTROL.search(out.getvalue())


def test_terminal_progress_draws_a_live_panel():
    from dsrun.runtime.monitor.progress import Progress
    out = io.StringIO()
    progress = Progress(steps_per_print=0, total_steps=10, stream=out, terminal=True)
    progress.show({"step": 3, "loss": 0.5, "lr": 1e-3, "skipped": 1}, eta_s=5)
    progress.close()
    assert "loss" in out.getvalue() and "0.5000" in out.getvalue()


@pytest.mark.parametrize("section,package", [("wandb", "wandb"), ("comet", "comet_ml"),
                                             ("tensorboard", "tensorboard")])
def test_enabled_monitor_without_its_package_is_a_config_error(section, package, monkeypatch):
    # the package made absent for this process (a None entry in sys.modules: import and find_spec say
    # missing), so the test runs whether or not the test extras installed it
    monkeypatch.setitem(sys.modules, package, None)
    from dsrun.runtime.monitor.monitors import build_monitors
    cfg = load_config({"train_batch_size": 2, section: {"enabled": True}})
    with pytest.raises(ConfigError) as err:
        build_monitors(cfg, rank=1)
    assert err.value.where == f"{section}.enabled" and f"'{package}'" in str(err.value)
    assert err.value.exit_code == 2


def test_config_keys_are_strict():
    cfg = load_config({"train_batch_size": 2})
    assert cfg.metrics.enabled and cfg.metrics.output_path == "output/deepspeed_metrics"
    assert cfg.hang_watchdog.enabled and cfg.hang_watchdog.timeout_s == 300
    with pytest.raises(ConfigError, match=r"metrics.ouput_path: unknown key 'ouput_path' \(did you mean 'output_path'"):
        load_config({"train_batch_size": 2, "metrics": {"ouput_path": "x"}})
    with pytest.raises(ConfigError, match=r"hang_watchdog.timeout_s: must be > 0"):
        load_config({"train_batch_size": 2, "hang_watchdog": {"timeout_s": 0}})


CRASHING = """
import torch, dsrun
engine, _, _, _ = dsrun.initialize(model=torch.nn.Linear(4, 1), config={
    "train_batch_size": 2, "steps_per_print": 5, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
for step in range(7):
    engine.backward(engine(torch.randn(2, 4)).pow(2).mean())
    engine.step()
raise RuntimeError("boom at step 7")
"""


def test_a_crash_leaves_the_rows_so_far_and_a_failed_summary(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CRASHING], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "boom at step 7" in proc.stderr
    folder = tmp_path / "output" / "deepspeed_metrics"
    rows = _read_csv(folder / "training_metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 8)) and all(r["loss"] for r in rows)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 7
    assert _png_size(folder / "training_curves.png")[0] >= 600
    assert "step 5 | loss" in proc.stdout and "step 7" not in proc.stdout  # a line every steps_per_print steps


def test_bus_bandwidth_factors():
    from dsrun.runtime.monitor.comms_logger import bus_factor
    assert bus_factor("all_reduce", 4) == 1.5 and bus_factor("all_gather", 4) == 0.75
    assert bus_factor("reduce_scatter", 1) == 0.0


def _no_training_job(rank, world_size, outdir):
    import torch

    import dsrun
    engine, _, _, _ = dsrun.initialize(model=torch.nn.Linear(4, 1), config={
        "train_batch_size": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "metrics": {"output_path": outdir}})
    with torch.no_grad():
        engine(torch.randn(2, 4))
    engine.destroy()
    return True


def test_an_engine_that_never_trains_leaves_no_folder(tmp_path):
    outdir = str(tmp_path / "m")
    run_ranks(_no_training_job, world_size=1, args=(outdir,))
    assert not os.path.exists(outdir)
