"""dsrun's logger in the ranks (runtime/log.py), through the real launcher: the level reaches the ranks
(`-q` silences their warnings), each line names its level, warnings every rank would repeat come once
from rank 0, and rank 0 lists what each "auto" config value became."""
import logging
import os
import subprocess
import sys

from dsrun.runtime import log as rank_log

UX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launcher", "scripts", "ux.py")
DSRUN = [sys.executable, "-m", "dsrun.launcher.cli"]


def _dsrun(tmp_path, *args, timeout=120):
    env = {**os.environ, "DSRUN_TEST_OUT": str(tmp_path)}
    return subprocess.run(DSRUN + list(args), capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=timeout)


def test_rank_warnings_have_a_level_and_shared_ones_come_once_from_rank_0(tmp_path):
    proc = _dsrun(tmp_path, "--num_gpus", "2", UX, "warn")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert [line for line in lines if "shared warning" in line] == \
        ["[rank 0] [dsrun] WARNING: shared warning from the config"]
    for rank in (0, 1):
        assert f"[rank {rank}] [dsrun] WARNING: per-rank warning" in lines
        assert f"[rank {rank}] [dsrun] INFO: per-rank info" in lines  # dsrun's default --log_level is info


def test_quiet_and_log_level_reach_the_ranks(tmp_path):
    quiet = _dsrun(tmp_path, "-q", "--num_gpus", "2", UX, "warn")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    warning = _dsrun(tmp_path, "--log_level", "warning", "--num_gpus", "2", UX, "warn")
    assert warning.returncode == 0, warning.stderr
    assert "INFO" not in warning.stderr and warning.stderr.count("WARNING: per-rank warning") == 2


def test_auto_values_and_config_deprecations_are_reported_once_by_rank_0(tmp_path):
    proc = _dsrun(tmp_path, "--num_gpus", "2", UX, "auto")
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == ["[rank 0] micro batch 4", "[rank 1] micro batch 4"]
    auto = [line for line in proc.stderr.splitlines() if '"auto" values' in line]
    assert len(auto) == 1 and auto[0].startswith("[rank 0] [dsrun] INFO: "), proc.stderr
    assert "train_micro_batch_size_per_gpu = 4 (" in auto[0] and "optimizer.params.lr = 0.001" in auto[0]
    deprecations = [line for line in proc.stderr.splitlines() if "cpu_offload is deprecated" in line]
    assert len(deprecations) == 1 and deprecations[0].startswith("[rank 0] "), proc.stderr


def test_warn_once_rank0_in_process(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="dsrun")
    monkeypatch.setenv("RANK", "1")
    rank_log.warn_once_rank0("from rank %s", "one")
    monkeypatch.setenv("RANK", "0")
    for _ in range(3):
        rank_log.warn_once_rank0("from rank %s", "zero")
    assert [r.getMessage() for r in caplog.records] == ["from rank zero"]
    assert all(r.levelname == "WARNING" for r in caplog.records)
