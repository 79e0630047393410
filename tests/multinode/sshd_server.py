"""A throwaway OpenSSH server on loopback, shared by the multinode tests and the fan-out benchmark.

`LoopbackSshd(workdir, addresses)` writes a host key, a client key, `sshd_config` (listening on every
given 127.0.0.x address, one free port), `authorized_keys`, an ssh `config` (one `Host` block per
address: Port, User, IdentityFile, UserKnownHostsFile) and `known_hosts`, then starts `sshd -D`.
`home` is a directory laid out like a HOME (`home/.ssh/config`), so a child given `HOME=home` finds
the configuration the way a user's tools would; OpenSSH's own client ignores `$HOME`, hence
`ssh_args` (`-F config`) for pdsh and mpirun.
"""
import getpass
import os
import shutil
import socket
import subprocess
import time

__all__ = ["LoopbackSshd", "sshd_missing_reason", "free_port"]


def sshd_missing_reason():
    for tool in ("sshd", "ssh-keygen", "ssh"):
        if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")):
            return f"{tool} not installed (apt-get install openssh-server openssh-client)"
    return None


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackSshd:
    def __init__(self, workdir, addresses=("127.0.0.1", "127.0.0.2"), port=None):
        self.workdir = os.path.abspath(workdir)
        self.addresses = tuple(addresses)
        self.port = port or free_port()
        self.home = os.path.join(self.workdir, "home")
        self.ssh_dir = os.path.join(self.home, ".ssh")
        self.config = os.path.join(self.ssh_dir, "config")
        self.known_hosts = os.path.join(self.ssh_dir, "known_hosts")
        self.client_key = os.path.join(self.ssh_dir, "id_ed25519")
        self.procs = []

    @property
    def ssh_args(self):
        """Options for the OpenSSH client (pdsh, mpirun) equivalent to `home/.ssh/config`."""
        return f"-F {self.config}"

    def start(self, timeout=10.0):
        os.makedirs(self.ssh_dir, mode=0o700, exist_ok=True)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        host_key = os.path.join(self.workdir, "ssh_host_ed25519_key")
        for key in (host_key, self.client_key):
            if not os.path.exists(key):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
        authorized = os.path.join(self.workdir, "authorized_keys")
        shutil.copy(self.client_key + ".pub", authorized)
        os.chmod(authorized, 0o600)
        # OpenSSH listens on at most 16 sockets per daemon, so larger sets get one sshd per 16 addresses.
        groups = [self.addresses[i:i + 16] for i in range(0, len(self.addresses), 16)]
        for index, group in enumerate(groups):
            self._write_sshd_config(index, group, host_key, authorized)
        self._write_client_files(host_key)
        os.makedirs("/run/sshd", exist_ok=True)  # privilege-separation directory sshd insists on
        log = open(os.path.join(self.workdir, "sshd.log"), "w")
        self.procs = [subprocess.Popen([sshd, "-D", "-e", "-f", os.path.join(self.workdir, f"sshd_config.{i}")],
                                       stdin=subprocess.DEVNULL, stderr=log) for i in range(len(groups))]
        log.close()
        self._wait_ready(timeout)
        return self

    def _write_sshd_config(self, index, group, host_key, authorized):
        listen = "".join(f"ListenAddress {a}:{self.port}\n" for a in group)
        with open(os.path.join(self.workdir, f"sshd_config.{index}"), "w") as f:
            f.write(f"Port {self.port}\n{listen}HostKey {host_key}\nPidFile {self.workdir}/sshd.pid\n"
                    f"AuthorizedKeysFile {authorized}\nPermitRootLogin yes\nStrictModes no\nUsePAM no\n"
                    "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
                    f"MaxStartups 200:30:400\nMaxSessions 200\nLogLevel ERROR\nSubsystem sftp internal-sftp\n"
                    + self._session_env())

    @staticmethod
    def _session_env():
        # Remote agents must import the dsrun under test: a source checkout run with PYTHONPATH (not
        # installed) is only found by the "nodes" if their sessions get the same PYTHONPATH.
        path = os.environ.get("PYTHONPATH")
        return f"SetEnv PYTHONPATH={path}\n" if path and " " not in path else ""

    def _write_client_files(self, host_key):
        user = getpass.getuser()
        with open(self.config, "w") as f:
            for a in self.addresses:
                f.write(f"Host {a}\n  HostName {a}\n  Port {self.port}\n  User {user}\n"
                        f"  IdentityFile {self.client_key}\n  UserKnownHostsFile {self.known_hosts}\n"
                        "  StrictHostKeyChecking yes\n  BatchMode yes\n  LogLevel ERROR\n")
        with open(host_key + ".pub") as f:
            keytype, blob = f.read().split()[:2]
        with open(self.known_hosts, "w") as f:
            for a in self.addresses:
                f.write(f"[{a}]:{self.port} {keytype} {blob}\n")

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        pending = set(self.addresses)
        while pending:
            for a in list(pending):
                try:
                    with socket.create_connection((a, self.port), timeout=0.5) as s:
                        s.settimeout(2)
                        if s.recv(4).startswith(b"SSH-"):
                            pending.discard(a)
                except OSError:
                    pass
            if any(p.poll() is not None for p in self.procs):
                self.stop()
                raise RuntimeError("sshd exited: " + open(os.path.join(self.workdir, "sshd.log")).read())
            if pending and time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not answer on {sorted(pending)} within {timeout}s")
            if pending:
                time.sleep(0.05)

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
