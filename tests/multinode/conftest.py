"""Fixtures for multi-node tests: a real OpenSSH server answering on 127.0.0.1 and 127.0.0.2."""
import os
import shutil

import pytest

from .sshd_server import LoopbackSshd, sshd_missing_reason


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    reason = sshd_missing_reason()
    if reason:  # a test that needs a tool fails without it: .ci/run installs it
        pytest.fail(f"{reason} (.ci/run installs it)")
    server = LoopbackSshd(str(tmp_path_factory.mktemp("sshd")), addresses=("127.0.0.1", "127.0.0.2"))
    server.start()
    yield server
    server.stop()


def require(binary):
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} not installed (.ci/run installs it: apt-get install pdsh openmpi-bin openssh-server)")


@pytest.fixture
def job_dir(tmp_path):
    """A working directory with a two-host hostfile (127.0.0.1, 127.0.0.2; one slot each)."""
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    return tmp_path


@pytest.fixture
def clean_env(sshd):
    """A child environment whose HOME holds the fixture's ssh config and known_hosts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSRUN_", "PDSH_", "OMPI_", "PMI"))}
    env["HOME"] = sshd.home
    return env


