"""Errors raised inside ranks reach the terminal and failure.json (issue 10, defect 2).

torch's `init_process_group` wraps `sys.excepthook` and buffers stderr around the previous hook, so these
tests always start a process group first: each one is a real `dsrun --num_gpus 2` job.
"""
import json
import re

from tests.trust._job import CONFIG, failure_record, run_job

INIT = """
engine, *_ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
"""


def test_bad_config_is_printed_and_recorded(tmp_path):
    # The launcher validates a config named in the script's arguments before starting any rank
    # (launcher/preflight.py); this one is named only inside the script, so the ranks meet it.
    bad = dict(CONFIG, zero_optimization={"stage": 1, "offload_optimizer": {"devcie": "cpu"}})
    (tmp_path / "bad.json").write_text(json.dumps(bad, indent=1))
    body = """
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                  config=os.path.join(os.getcwd(), "bad.json"))
"""
    proc = run_job(tmp_path, body)
    assert proc.returncode == 2, proc.stderr
    wanted = "zero_optimization.offload_optimizer.devcie: unknown key 'devcie' (did you mean 'device'?)"
    # The failing rank prints its own line on the real stderr (the other may be stopped before it reaches
    # the config), and the panel repeats the root cause's.
    assert proc.stderr.count(wanted) >= 2, proc.stderr
    assert re.search(r"^\[rank (\d)\] dsrun: error \(rank \1\): .*devcie", proc.stderr, re.M), proc.stderr
    assert "Traceback" not in proc.stderr
    root = failure_record(tmp_path)["root_cause"]
    assert wanted in root["error"] and root["exitcode"] == 2
    with open(root["error_file"]) as f:
        record = json.load(f)
    assert record["dsrun"]["type"] == "ConfigError" and record["dsrun"]["exit_code"] == 2


def test_missing_checkpoint_tag_names_the_folder(tmp_path):
    body = INIT + """
engine.save_checkpoint(os.path.join(os.getcwd(), "ckpt"), tag="step1")
engine.load_checkpoint(os.path.join(os.getcwd(), "ckpt"), tag="nope")
"""
    proc = run_job(tmp_path, body)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    root = failure_record(tmp_path)["root_cause"]
    assert "nope" in root["error"] and "ckpt" in root["error"], root
    assert root["error"].splitlines()[0] in proc.stderr


def test_other_exceptions_keep_their_traceback_and_are_recorded(tmp_path):
    body = INIT + """
if engine.global_rank == 1:
    raise RuntimeError("boom in rank one")
torch.distributed.barrier()
"""
    proc = run_job(tmp_path, body)
    assert proc.returncode == 1, proc.stderr
    assert "RuntimeError: boom in rank one" in proc.stderr and "Traceback" in proc.stderr
    root = failure_record(tmp_path)["root_cause"]
    assert root["rank"] == 1 and root["error"] == "RuntimeError: boom in rank one"
    with open(root["error_file"]) as f:
        stack = json.load(f)["message"]["extraInfo"]["py_callstack"]
    assert "raise RuntimeError" in stack


def test_nccl_without_gpus_is_a_usage_error(tmp_path):
    """DeepSpeedExamples default to `--backend nccl`; on a CPU machine that is exit 2 with the fix named, not
    torch's traceback about a missing NCCL build."""
    proc = run_job(tmp_path, 'deepspeed.init_distributed(dist_backend="nccl")\n')
    assert proc.returncode == 2, proc.stderr
    assert "dist_backend 'nccl' cannot run here" in proc.stderr and "gloo" in proc.stderr
    assert "Traceback" not in proc.stderr
