"""Plan-level tests: every multi-node launcher's command line (reference 7.2), without spawning, and
the driver's merge of agent reports into one job-level failure record."""
import io
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dsrun.errors import UsageError
from dsrun.launcher import multinode
from dsrun.launcher.cli import cli
from dsrun.launcher.failure import FailureReport, RankFailure
from dsrun.launcher.plan import plan
from dsrun.launcher.spec import AgentSpec, LaunchSpec
from dsrun.launcher.transports.common import JobOutcome, read_spec_line, remote_line, spec_line
from dsrun.launcher.transports.node_entry import agent_job_id
from dsrun.launcher.transports.pdsh import PdshTransport
from dsrun.launcher.transports.ssh import SshOptions

POOL = {"worker-0": 4, "worker-1": 4}


def make(launcher, **kw):
    kw.setdefault("force_multi", True)
    kw.setdefault("cwd", "/work dir")
    spec = LaunchSpec(script="test_launcher.py", resource_pool=dict(POOL), launcher=launcher, job_id="job-1",
                      python="/usr/bin/python3", **kw)
    return spec, plan(spec)


def argv(p):
    return list(p.commands[0].argv)


def test_ssh_one_command_per_node_without_the_spec():
    spec, p = make("ssh", ssh_port=2222, venv_script="~/venv/bin/activate", script_args=("--x", "a b", "$(id)"))
    assert [c.host for c in p.commands] == ["worker-0", "worker-1"]
    command = p.commands[1]
    assert SshOptions(**command.options) == SshOptions(port=2222, venv_script="~/venv/bin/activate")
    assert command.argv[:3] == ("ssh", "-p", "2222") and command.argv[-2] == "worker-1"
    line = command.argv[-1]
    assert line == ("cd '/work dir' && . \"$HOME\"/venv/bin/activate && exec /usr/bin/python3 -u -m "
                    "dsrun.launcher.agent --job_id job-1 --lifeline stdin")
    assert p.agents[1].node_rank == 1 and p.agents[1].worker.script_args == ("--x", "a b", "$(id)")
    assert multinode.execute.__module__ == "dsrun.launcher.multinode"


def test_spec_line_round_trips_and_is_read_up_to_its_newline(tmp_path):
    _, p = make("ssh", env_file_vars={"MULTI": "line one\nline two"})
    path = tmp_path / "stdin"
    path.write_bytes(spec_line(p.agents[1]) + b"lifeline noise")
    with open(path, "rb") as f:
        assert AgentSpec.from_json(read_spec_line(f.fileno())) == p.agents[1]
    path.write_bytes(b'{"job_id": "cut')
    with open(path, "rb") as f, pytest.raises(ValueError, match="ended before"):
        read_spec_line(f.fileno())


@pytest.mark.parametrize("launcher", ["ssh", "pdsh"])
def test_no_value_and_no_spec_in_any_argv(launcher):
    secret = "hf_" + "s3cr3t" * 4
    big = "x" * 300_000
    _, p = make(launcher, environ={"HF_TOKEN": secret},
                env_file_vars={"BIG": big, "MLFLOW_TRACKING_PASSWORD": "pw123456"})
    assert p.env["HF_TOKEN"] == secret and p.env["BIG"] == big
    words = [w for c in p.commands for w in c.argv]
    assert not any(secret in w or "pw123456" in w or "xxxx" in w or "--spec" in w for w in words)
    assert max(len(w) for w in words) < 1000  # far from Linux's 128 KiB limit on one argument
def test_ssh_rejects_launcher_args():
    with pytest.raises(UsageError, match="launcher_args"):
        make("ssh", launcher_args="-o Foo=bar")


def test_pdsh_command_and_env():
    spec, p = make("pdsh", ssh_port=2200, launcher_args="-l alice", environ={"PDSH_SSH_ARGS_APPEND": "-F cfg"})
    cmd = argv(p)
    assert cmd[0] == "pdsh" and cmd[cmd.index("-w") + 1] == "worker-0,worker-1" and "-S" in cmd
    assert cmd[cmd.index("-l") + 1] == "alice" and cmd[cmd.index("-R") + 1] == "exec"
    relay = cmd.index("dsrun.launcher.transports.pdsh_relay")
    assert cmd[relay + 1].endswith("job-1-spec/node-%n")
    ssh = cmd[relay + 2:]
    assert ssh[:2] == ["ssh", "-oConnectTimeout=10"] and "-l%u" in ssh and "%h" in ssh
    assert ssh[ssh.index("-F") + 1] == "cfg" and ssh[ssh.index("-p") + 1] == "2200"
    assert ssh[-1] == ("cd '/work dir' && exec /usr/bin/python3 -u -m dsrun.launcher.agent --job_id job-1 "
                       "--node_rank %n --lifeline stdin")
    kill = PdshTransport.from_options("pdsh", p.commands[0].options).kill_command(p)
    assert kill.env["PDSH_RCMD_TYPE"] == "ssh" and kill.env["PDSH_SSH_ARGS_APPEND"] == "-F cfg -p 2200"
    assert kill.argv[-1] == "/usr/bin/python3 -m dsrun.launcher.transports.node_entry --kill job-1 --grace 5"
    assert "-R" not in kill.argv


def test_pdsh_escapes_percent_signs_of_its_own_words():
    _, p = make("pdsh", cwd="/data/100%n")
    cmd = argv(p)
    assert cmd[-1] == ("cd /data/100%%n && exec /usr/bin/python3 -u -m dsrun.launcher.agent --job_id job-1 "
                       "--node_rank %n --lifeline stdin")


def test_pdsh_port_without_previous_append():
    _, p = make("pdsh", ssh_port=2200)
    kill = PdshTransport.from_options("pdsh", p.commands[0].options).kill_command(p)
    assert kill.env["PDSH_SSH_ARGS_APPEND"] == "-p 2200"
    assert "-l%u" not in argv(p)  # as pdsh's ssh module: ~/.ssh/config's User unless a user is named
    spec = LaunchSpec(script="t.py", resource_pool={"alice@worker-0": 1, "worker-1": 1}, launcher="pdsh",
                      job_id="job-1", python="/usr/bin/python3")
    assert "-l%u" in argv(plan(spec))


@pytest.mark.parametrize("args", ["-R ssh", "-Rssh", "-t 5"])
def test_pdsh_rejects_options_that_fight_its_exec_module(args):
    with pytest.raises(UsageError, match="cannot be used with dsrun's pdsh transport"):
        make("pdsh", launcher_args=args)


def test_openmpi_defaults_and_env_by_name():
    _, p = make("openmpi", master_port=29700, env_file_vars={"Y": 'a b "c"'})
    cmd = argv(p)
    assert cmd[0] == "mpirun" and "eth0" in cmd
    assert cmd[cmd.index("-n") + 1] == "8" and cmd[cmd.index("-H") + 1] == "worker-0:4,worker-1:4"
    assert "-x" in cmd and "Y" in cmd and not any('a b "c"' in a for a in cmd)  # values ride in the env
    env = p.commands[0].env
    assert env["Y"] == 'a b "c"' and env["MASTER_PORT"] == "29700" and env["MASTER_ADDR"] == p.master_addr
    assert "dsrun.launcher.transports.mpi_worker" in cmd


@pytest.mark.parametrize("args", ["-mca btl_tcp_if_include eth1", "--mca btl_tcp_if_include eth1"])
def test_openmpi_user_interface_replaces_eth0(args):
    cmd = argv(make("openmpi", launcher_args=args)[1])
    assert "eth0" not in cmd and "eth1" in cmd


@pytest.mark.parametrize("launcher", ["mpich", "impi", "mvapich"])
def test_hydra_family(launcher):
    _, p = make(launcher, launcher_args="-verbose")
    cmd = argv(p)
    assert cmd[0] == "mpirun" and cmd[cmd.index("-ppn") + 1] == "4" and "-verbose" in cmd
    assert cmd[cmd.index("-hosts") + 1] == "worker-0,worker-1"
    listed = cmd[cmd.index("-genvlist") + 1].split(",")
    assert {"MASTER_ADDR", "MASTER_PORT", "DSRUN_JOB_ID"} <= set(listed) and set(listed) == set(p.commands[0].env)


@pytest.mark.parametrize("launcher", ["mpich", "impi", "mvapich"])
def test_hydra_needs_equal_counts(launcher):
    with pytest.raises(UsageError, match="same slot count"):
        make(launcher, exclude="worker-1:2,3")


@pytest.mark.parametrize("launcher", ["openmpi", "mpich", "slurm"])
def test_scheduler_launchers_reject_what_they_cannot_do(launcher):
    with pytest.raises(UsageError, match="max_restarts"):
        make(launcher, max_restarts=2)


def test_slurm_default():
    cmd = argv(make("slurm")[1])
    assert cmd[0] == "srun" and cmd[cmd.index("-n") + 1] == "8" and "--nodelist" not in cmd


@pytest.mark.parametrize("kw, nodelist, nodes, n", [
    (dict(exclude="worker-1"), "worker-0", "1", "4"),
    (dict(include="worker-0:0,1@worker-1:0,1"), "worker-0,worker-1", "2", "4"),
    (dict(num_gpus=2), None, None, "4"),
    (dict(num_nodes=1), None, "1", "4"),
])
def test_slurm_reference_cases(kw, nodelist, nodes, n):
    cmd = argv(make("slurm", **kw)[1])
    assert cmd[cmd.index("-n") + 1] == n and "--include" not in cmd and "--exclude" not in cmd
    assert (cmd[cmd.index("--nodelist") + 1] if "--nodelist" in cmd else None) == nodelist
    assert cmd.count("--nodes") == (0 if nodes is None else 1)
    if nodes:
        assert cmd[cmd.index("--nodes") + 1] == nodes
    if "num_gpus" in kw:
        assert cmd.count("--gpus-per-node") == 1 and cmd[cmd.index("--gpus-per-node") + 1] == "2"
    assert "--export=ALL" in cmd


@pytest.mark.parametrize("kw, message", [
    (dict(include="worker-1:0,2"), "specific device ids"),
    (dict(exclude="worker-1:0"), "specific device ids"),
    (dict(exclude="worker-1:1,2,3"), "same slot count"),
])
def test_slurm_rejections(kw, message):
    with pytest.raises(UsageError, match=message):
        make("slurm", **kw)


def test_remote_line_quotes_every_word():
    line = remote_line("/a b", ["py", "$(touch x)", "a'b"], venv_script="/v;rm")
    assert line == "cd '/a b' && . '/v;rm' && exec py '$(touch x)' 'a'\"'\"'b'"


def _report(host, node_rank, *failures, exitcode=None, **extra):
    ranks = [RankFailure(rank=r, local_rank=0, host=host, pid=100 + r, exitcode=code, signal=sig, timestamp=t,
                         tail=[f"rank {r} said bye"]) for r, code, sig, t in failures]
    report = FailureReport(job_id="job-1", host=host, node_rank=node_rank, failures=ranks,
                           exitcode=exitcode if exitcode is not None else (ranks[0].exitcode if ranks else 0))
    data = report.to_dict()
    for item in data["failures"]:
        item.update(extra)  # fields a newer agent may add pass through from_dict untouched or dropped
    return data


def test_job_outcome_merges_every_node_and_writes_one_record(tmp_path):
    _, p = make("ssh", log_dir=str(tmp_path / "logs"))
    outcome = JobOutcome(p)
    outcome.add_report(_report("worker-0", 0, (1, 1, None, 20.0)))
    outcome.add_report(_report("worker-1", 1, (6, 137, "SIGKILL", 10.0), (7, 143, "SIGTERM", 11.0)))
    outcome.add_report(dict(_report("elsewhere", 0, (0, 9, None, 1.0)), job_id="another-job"))  # ignored
    err = io.StringIO()
    assert outcome.finish(None, stream=err) == 137
    record = json.loads((tmp_path / "logs" / "failure.json").read_text())
    assert record["root_cause"]["rank"] == 6 and record["root_cause"]["host"] == "worker-1"
    assert [f["rank"] for f in record["failures"]] == [6, 7, 1] and record["node_rank"] is None
    text = err.getvalue()
    assert "Root cause (first failure): rank 6 (local_rank 0) on worker-1" in text
    assert "SIGKILL" in text and "rank 6 said bye" in text and str(tmp_path / "logs" / "failure.json") in text


def test_job_outcome_lost_and_unreachable_nodes(tmp_path):
    _, p = make("pdsh", log_dir=str(tmp_path))
    unreachable = JobOutcome(p)
    unreachable.node_lost("worker-1", 255, "ssh could not connect")
    err = io.StringIO()
    assert unreachable.finish(None, stream=err) == 2
    assert "Node worker-1 (node_rank 1) ended without a report: ssh could not connect" in err.getvalue()
    assert json.loads((tmp_path / "failure.json").read_text())["lost_nodes"][0]["host"] == "worker-1"
    stopped = JobOutcome(p)
    stopped.add_report(_report("worker-0", 0, exitcode=129))  # torn down, nothing failed on its own
    assert stopped.finish(2, stream=io.StringIO()) == 130  # dsrun's own SIGINT
    assert JobOutcome(p).finish(None, stream=io.StringIO()) == 0


def test_rank_failure_from_dict_keeps_known_fields():
    data = _report("h", 0, (3, 1, None, 5.0), future_field="x")["failures"][0]
    restored = RankFailure.from_dict(data)
    assert restored.rank == 3 and restored.tail == ["rank 3 said bye"] and restored.to_dict()["time"] == data["time"]


def test_kill_matches_the_job_id_only():
    assert agent_job_id(["python", "-u", "-m", "dsrun.launcher.agent", "--job_id", "job-1", "--lifeline", "stdin"]) \
        == "job-1"
    assert agent_job_id(["python", "-m", "other", "--job_id", "job-1"]) is None
    assert agent_job_id(["ssh", "host", "cd / && exec python -m dsrun.launcher.agent --job_id job-1"]) is None


def test_dry_run_masks_secret_looking_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.py").write_text("")  # a local dry run checks that the script exists
    (tmp_path / ".deepspeed_env").write_text("WANDB_API_KEY=k3y-value-1\nTOKENIZERS_PARALLELISM=false\n")
    (tmp_path / "hostfile").write_text("worker-0 slots=1\nworker-1 slots=1\n")
    env = {"HOME": str(tmp_path), "HF_TOKEN": "hf_abcdef", "CUDA_VISIBLE_DEVICES": "", "DS_ENV_FILE": None}
    local = CliRunner().invoke(cli, ["--dry_run", "--num_gpus", "1", "t.py", "--token", "hf_abcdef",
                                     "--key=k3y-value-1"], env=env)
    assert local.exit_code == 0, local.output
    out = json.loads(local.stdout)
    assert out["env"]["HF_TOKEN"] == "***" and out["env"]["WANDB_API_KEY"] == "***"
    assert out["env"]["TOKENIZERS_PARALLELISM"] == "false"
    assert out["commands"][0]["argv"][-3:] == ["--token", "***", "--key=***"]
    assert "hf_abcdef" not in local.stdout and "k3y-value-1" not in local.stdout
    for launcher in ("ssh", "pdsh", "openmpi"):
        multi = CliRunner().invoke(cli, ["--dry_run", "-H", "hostfile", "--launcher", launcher, "t.py"], env=env)
        assert multi.exit_code == 0, multi.output
        assert "hf_abcdef" not in multi.stdout and "k3y-value-1" not in multi.stdout
        assert set(json.loads(multi.stdout)) == {"world_info", "world_size", "master_addr", "master_port",
                                                 "launcher", "node_rank", "commands", "env", "job_id"}


def test_help_imports_neither_paramiko_nor_torch():
    code = ("import sys\nfrom dsrun.launcher import cli, multinode\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit as e:\n    code = e.code\n"
            "print(code, 'paramiko' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split()[-3:] == ["0", "False", "False"], out.stderr
