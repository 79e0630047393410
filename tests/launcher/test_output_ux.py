"""The ranks' output as a person sees it: partial lines, `\\r` progress bars (piped and on a terminal),
torch's doubled rank prefix, the rank filter, colour decisions (TERM=dumb, NO_COLOR) and a quiet Ctrl-C.

Most tests run the real `dsrun` command on tests/launcher/scripts/ux.py; terminals are pseudo-terminals
(pty). A few drive `ConsoleWriter`/`RankStream` directly with bytes split where a pipe may split them.
"""
import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

from dsrun.launcher.agent import NodeAgent
from dsrun.launcher.output import ConsoleWriter, RankStream, new_tail
from dsrun.launcher.spec import AgentSpec, WorkerOptions

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
UX = os.path.join(SCRIPTS, "ux.py")
DSRUN = [sys.executable, "-m", "dsrun.launcher.cli"]


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM")}
    return {**env, "DSRUN_TEST_OUT": str(tmp_path), **extra}


def _ranks_only(text):
    """`text` without dsrun's own start and end lines (`dsrun: starting ...`, `dsrun: ... finished ...`)."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("dsrun: "))


def _on_pty(argv, env, cwd, timeout=60):
    """Run `argv` with stdout and stderr on one pseudo-terminal; returns (exit code, bytes written)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=cwd)
    os.close(slave)
    data, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                break
            if not chunk:
                break
            data += chunk
        return proc.wait(timeout=10), data
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


# ------------------------------------------------------------------ piped
def test_piped_partial_line_is_shown_before_its_newline_and_bar_only_as_last_state(tmp_path):
    proc = subprocess.Popen(DSRUN + ["--num_gpus", "1", UX, "bar"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(tmp_path), cwd=tmp_path)
    try:
        seen, deadline = b"", time.monotonic() + 60
        while b"loading" not in seen and time.monotonic() < deadline:
            seen += os.read(proc.stdout.fileno(), 4096)  # the rank sleeps 1 s before " done\n"
        assert seen == b"[rank 0] loading", seen  # shown with its prefix while the line is still open
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert (seen + out).decode() == "[rank 0] loading done\n"  # continued without a second prefix
    assert _ranks_only(err.decode()) == "[rank 0] bar 100%\n"  # no \r, no intermediate states


def test_torch_excepthook_prefix_is_not_doubled(tmp_path):
    proc = subprocess.run(DSRUN + ["--num_gpus", "2", UX, "torch"], capture_output=True, text=True,
                          env=_env(tmp_path), cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(_ranks_only(proc.stderr).splitlines()) == ["[rank 0] Traceback line", "[rank 1] Traceback line"]


# ------------------------------------------------------------------ terminal
def test_progress_bar_on_a_terminal_updates_live_with_the_prefix(tmp_path):
    code, data = _on_pty(DSRUN + ["--num_gpus", "1", UX, "bar"], _env(tmp_path, TERM="xterm", NO_COLOR="1"),
                         tmp_path)
    text = data.decode()
    assert code == 0, text
    assert "[rank 0] loading done\r\n" in text
    for pct in (25, 50, 75, 100):  # each update rewrites the line, prefix included
        assert f"\r[rank 0] bar {pct:3d}%" in text, text
    assert text.count("[rank 0] ") == 6


def test_term_dumb_and_no_color_give_no_escape_codes(tmp_path):
    for extra in ({"TERM": "dumb"}, {"TERM": "xterm", "NO_COLOR": "1"}):
        code, data = _on_pty(DSRUN + ["--num_gpus", "1", UX, "fail"], _env(tmp_path, **extra), tmp_path)
        assert code == 3, data
        assert b"[rank 0] about to fail" in data and b"Root cause" in data
        assert b"\x1b" not in data, (extra, data)
    code, data = _on_pty(DSRUN + ["--num_gpus", "1", UX, "fail"], _env(tmp_path, TERM="xterm"), tmp_path)
    assert code == 3 and b"\x1b[" in data  # a colour terminal still gets colours


# ------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_of_two_ranks_prints_one_line_per_rank_then_the_summary(tmp_path):
    proc = subprocess.Popen(DSRUN + ["--num_gpus", "2", UX, "wait"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=_env(tmp_path), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline and proc.poll() is None, "ranks did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGINT, out
    lines = out.splitlines()
    assert len(lines) < 15, out
    assert "Traceback" not in out and "sys.excepthook" not in out
    for rank in (0, 1):
        assert sum(line.startswith(f"[rank {rank}] interrupted (KeyboardInterrupt) at ux.py:") for line in lines) == 1
    assert "dsrun received SIGINT" in out


# ------------------------------------------------------------------ rank filter
def test_output_ranks_shows_only_the_chosen_ranks(tmp_path):
    worker = WorkerOptions(script=UX, script_args=("torch",), python=sys.executable, output_ranks=(1,),
                           log_dir=str(tmp_path / "logs"))
    spec = AgentSpec(job_id="filter", world_info={"localhost": [0, 1]}, node_rank=0, master_addr="127.0.0.1",
                     master_port=29500, env={}, worker=worker, cwd=str(tmp_path), devices=())
    assert AgentSpec.from_json(spec.to_json()) == spec  # the filter reaches remote agents
    out, err = io.StringIO(), io.StringIO()
    assert NodeAgent(spec, out=out, err=err).run() == 0
    assert err.getvalue() == "[rank 1] Traceback line\n" and out.getvalue() == ""


# ------------------------------------------------------------------ the stream itself
def _stream(live=False, rank=0, delay=0.0):
    out, err = io.StringIO(), io.StringIO()
    err.isatty = lambda: live  # a terminal or a pipe, as far as the writer asks
    writer = ConsoleWriter(multi_node=False, host="h", out=out, err=err, colour=False, delay=delay)
    return RankStream(new_tail(), writer, rank=rank, stderr=True), writer, err


def test_lines_split_anywhere_come_out_whole_and_utf8_survives_the_split():
    stream, _, err = _stream()
    data = "héllo\r\nwörld\n".encode()
    for i in range(len(data)):
        stream.feed(data[i:i + 1])
    stream.finish()
    assert err.getvalue() == "[rank 0] héllo\n[rank 0] wörld\n"
    assert list(stream.tail) == ["héllo", "wörld"]


def test_partial_line_waits_for_the_delay_then_continues_without_a_prefix():
    stream, writer, err = _stream(delay=60.0)
    stream.feed(b"step 1 ")
    stream.flush(time.monotonic())
    assert err.getvalue() == ""  # not due yet
    stream.flush(time.monotonic() + 61)
    assert err.getvalue() == "[rank 0] step 1 "
    stream.feed(b"ok\n")
    assert err.getvalue() == "[rank 0] step 1 ok\n"


def test_another_ranks_line_ends_an_open_partial_first():
    stream, writer, err = _stream()
    other = RankStream(new_tail(), writer, rank=1, stderr=True)
    stream.feed(b"half")
    stream.flush(time.monotonic() + 1)
    other.feed(b"full line\n")
    stream.feed(b" rest\n")
    assert err.getvalue() == "[rank 0] half\n[rank 1] full line\n[rank 0]  rest\n"


def test_piped_bar_keeps_only_the_last_state_of_each_line():
    stream, _, err = _stream(live=False)
    stream.feed(b"\r 10%\r 50%")
    stream.flush(time.monotonic() + 1)  # a bar is never shown half-way when piped
    stream.feed(b"\r100%\ndone\n")
    assert err.getvalue() == "[rank 0] 100%\n[rank 0] done\n"


def test_tee_writes_each_rank_log_and_the_console(tmp_path):
    logs = tmp_path / "ranks"
    worker = WorkerOptions(script=UX, script_args=("fail",), python=sys.executable, each_rank_log_dir=str(logs),
                           tee=True, log_dir=str(tmp_path / "logs"), grace_period=2.0)
    spec = AgentSpec(job_id="tee", world_info={"localhost": [0]}, node_rank=0, master_addr="127.0.0.1",
                     master_port=29500, env={}, worker=worker, cwd=str(tmp_path), devices=())
    out, err = io.StringIO(), io.StringIO()
    agent = NodeAgent(spec, out=out, err=err)
    assert agent.run() == 3
    assert out.getvalue() == "[rank 0] about to fail\n"
    (name,) = os.listdir(logs)
    assert (logs / name).read_text() == "about to fail\n"
    assert agent.report.failures[0].tail == ["about to fail"]


def test_output_ranks_flag_through_the_cli(tmp_path):
    """`--output_ranks 1` (torchrun's `--local_ranks_filter` spelling too) shows only rank 1's lines."""
    (tmp_path / "hello.py").write_text("import os\nprint('hello from rank', os.environ['RANK'], flush=True)\n")
    for flag in ("--output_ranks", "--local_ranks_filter"):
        proc = subprocess.run([sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", "2", flag, "1", "hello.py"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "hello from rank 1" in proc.stdout and "hello from rank 0" not in proc.stdout


def test_training_progress_updates_in_place_under_dsrun_on_a_terminal(tmp_path):
    """Rank 0's progress (runtime/monitor/progress.py) is one `\\r`-rewritten line under `[rank 0]` at a
    terminal (the agent sets DSRUN_CONSOLE_TTY), and plain lines every steps_per_print when piped."""
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "examples")
    argv = [sys.executable, "-m", "dsrun.launcher.cli", "--num_gpus", "2", os.path.join(example, "train.py"),
            "--deepspeed_config", os.path.join(example, "ds_config.json"), "--epochs", "1"]
    env = {**os.environ, "TERM": "xterm", "OMP_NUM_THREADS": "1"}
    env.pop("NO_COLOR", None)
    code, data = _on_pty(argv, env, str(tmp_path), timeout=120)
    text = data.decode("utf-8", "replace")
    assert code == 0, text
    assert re.search(r"\r\S*\[rank 0\]\S* step 20/", text), text[-2000:]  # rewritten in place
    assert re.search(r"^\S*\[rank 0\]\S* epoch 0 step 64", text, re.M), text[-2000:]  # the script's line: its own
    piped = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert piped.returncode == 0 and "\r" not in piped.stdout
    assert re.search(r"^\[rank 0\] step 10/", piped.stdout, re.M), piped.stdout
