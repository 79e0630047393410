"""`dsrun-report` (a bug report's copy-paste block, `--json` with snake_case keys) and `dsrun-to-fp32`'s
command line, both on click, through their real entry points."""
import json
import os
import re
import subprocess
import sys

import dsrun


def _run(*argv):
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120)


def test_report_json_has_snake_case_keys_and_names_dsrun_torch_and_the_launchers():
    proc = _run("dsrun.kernels.report", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert list(report) == ["dsrun", "torch", "compilers", "op_cpu_adam", "op_fused_adam", "launchers"]
    for section, rows in report.items():
        assert re.fullmatch(r"[a-z0-9_]+", section)
        assert isinstance(rows, dict), (section, rows)  # no probe failed on this machine
        assert all(re.fullmatch(r"[a-z0-9_]+", key) for key in rows), (section, list(rows))
    assert report["dsrun"]["version"] == dsrun.__version__
    assert report["dsrun"]["install_path"] == os.path.dirname(os.path.abspath(dsrun.__file__))
    assert {"version", "cuda", "nccl"} <= set(report["torch"])
    assert {"cxx", "nvcc"} <= set(report["compilers"])
    assert set(report["launchers"]) == {"pdsh", "mpirun", "srun", "ssh"}


def test_report_text_is_one_fenced_block():
    proc = _run("dsrun.kernels.report")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "```text" and lines[-1] == "```"
    for needle in ("dsrun", "install path", "NCCL", "C++ compiler", "launchers", "pdsh"):
        assert needle in proc.stdout


def test_report_and_to_fp32_use_click_with_usage_errors_exiting_2():
    bad = _run("dsrun.kernels.report", "--nope")
    assert bad.returncode == 2 and "No such option" in bad.stderr
    usage = _run("dsrun.runtime.checkpoint.to_fp32", "-h")
    assert usage.returncode == 0 and "CHECKPOINT_DIR OUTPUT_FILE" in usage.stdout and "--tag" in usage.stdout
    missing = _run("dsrun.runtime.checkpoint.to_fp32")
    assert missing.returncode == 2 and "Missing argument" in missing.stderr
