"""dsrun-estimate and DeepSpeed's estimator functions, against the ZeRO paper's worked example."""
import json
import subprocess
import sys

import pytest
import torch

from dsrun.runtime.estimate import estimate_rows, model_state_bytes
from dsrun.runtime.estimate_cli import main, parse_count


def _gb(n):
    return round(n / 1e9, 1)


def test_zero_paper_worked_example():
    # 7.5B parameters on 64 GPUs: 120, 31.4, 16.6 and 1.9 GB per GPU (arXiv 1910.02054, figure 1)
    per_stage = [_gb(model_state_bytes(7.5e9, stage=s, num_gpus_per_node=8, num_nodes=8)[0]) for s in range(4)]
    assert per_stage == [120.0, 31.4, 16.6, 1.9]


def test_offload_moves_bytes_to_the_host():
    rows = {(r.stage, r.offload_optimizer, r.offload_param): r for r in estimate_rows(1e9, num_gpus_per_node=4)}
    assert len(rows) == 8 and rows[(0, False, False)].cpu_bytes == 0
    assert rows[(2, True, False)].gpu_bytes == 2e9  # only the 16-bit weights stay
    assert rows[(2, True, False)].cpu_bytes == 14e9  # 4 GPUs x (12 + 2) / 4 bytes per parameter
    assert rows[(3, True, True)].gpu_bytes == 0 and rows[(3, True, True)].cpu_bytes == 16e9
    for r in rows.values():  # offloading never loses bytes
        assert r.gpu_bytes * 4 + r.cpu_bytes == model_state_bytes(1e9, stage=r.stage, num_gpus_per_node=4)[0] * 4


def test_cli_json_rows(capsys):
    assert main(["--params", "7.5B", "--num_gpus", "8", "--num_nodes", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(set(r) == {"stage", "offload_optimizer", "offload_param", "gpu_bytes", "cpu_bytes"} for r in rows)
    plain = [r for r in rows if not r["offload_optimizer"] and not r["offload_param"]]
    assert [_gb(r["gpu_bytes"]) for r in plain] == [120.0, 31.4, 16.6, 1.9]


def _tiny_model():
    return torch.nn.Sequential(torch.nn.Linear(100, 10), torch.nn.Linear(10, 1))


def test_cli_model_factory_and_table(capsys):
    assert main(["--model", "tests.launcher.test_estimate:_tiny_model", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["gpu_bytes"] == 16 * 1021
    assert main(["--params", "1e9", "--num_gpus", "2"]) == 0
    table = capsys.readouterr().out
    assert "ZeRO stage" in table and "16.00 GB" in table and "9.00 GB" in table  # stage 0; stage 2 = 2 + 14/2


def test_cli_errors_exit_2(capsys):
    assert main([]) == 2
    assert "--params/--model" in capsys.readouterr().err
    assert main(["--params", "lots"]) == 2
    assert main(["--model", "no_such_module_xyz:f"]) == 2
    assert "--model" in capsys.readouterr().err


def test_console_entry_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "dsrun.runtime.estimate_cli", "--params", "125M", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)[0]["gpu_bytes"] == 16 * 125_000_000


@pytest.mark.parametrize("text,count", [("7.5e9", 7_500_000_000), ("7.5B", 7_500_000_000), ("125M", 125_000_000),
                                        ("1_000", 1000), ("3k", 3000)])
def test_parse_count(text, count):
    assert parse_count(text) == count


def test_deepspeed_estimators_under_their_names(capsys):
    from dsrun.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                           estimate_zero3_model_states_mem_needs_all_cold,
                                           estimate_zero3_model_states_mem_needs_all_live)
    from dsrun.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                  estimate_zero2_model_states_mem_needs_all_cold,
                                                  estimate_zero2_model_states_mem_needs_all_live, model_to_params)
    psi = 10**9
    assert estimate_zero2_model_states_mem_needs(psi, 8, 1, cpu_offload=False) == (int(4 * psi * 8 * 1.5),
                                                                                     2 * psi + 18 * psi // 8)
    assert estimate_zero2_model_states_mem_needs(psi, 8, 1, cpu_offload=True) == (int(psi * 32 * 1.5), 2 * psi)
    cpu, gpu, largest = estimate_zero3_model_states_mem_needs(psi, 10**8, 8, 1, cpu_offload=True,
                                                              cpu_offload_params=True, zero_init=True)
    assert (cpu, gpu, largest) == (int(psi * 18 * 1.5), 4 * 10**8, 4 * 10**8)
    assert model_to_params(_tiny_model()) == 1021
    assert estimate_zero2_model_states_mem_needs_all_cold(psi) is None
    estimate_zero2_model_states_mem_needs_all_live(_tiny_model())
    estimate_zero3_model_states_mem_needs_all_cold(psi, 10**8, num_gpus_per_node=8)
    estimate_zero3_model_states_mem_needs_all_live(_tiny_model())
    out = capsys.readouterr().out
    assert out.count("per CPU  |  per GPU |   Options") == 4 and "offload_param=cpu , offload_optimizer=cpu , zero_init=1" in out
