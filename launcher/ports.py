"""Master-port checks on this machine: pick a free port, refuse one that is taken.

The CLI calls these before planning or executing; `plan()` itself never touches the network. Binding
happens on all interfaces, as rank 0's TCPStore will (DeepSpeed issues #191, #1479, #3878). A check here
is a snapshot: a port found free may be taken before rank 0 binds it, and two jobs started together
both pass. What keeps such jobs apart is the job-id check at rendezvous (runtime/dist.py).
"""
from __future__ import annotations

import errno
import socket
from typing import Optional

from dsrun.errors import LaunchError

__all__ = ["find_free_port", "port_in_use", "ensure_port_free"]


def find_free_port() -> int:
    """A TCP port that is free right now (the kernel's choice; torchrun does the same)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether binding `port` on all interfaces fails because something holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the TCPStore: SO_REUSEADDR, so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def ensure_port_free(port: int, *, flag: str = "--master_port") -> None:
    """Raise `LaunchError` naming `flag` (and the holder's pid when visible) if `port` is taken."""
    if not port_in_use(port):
        return
    holder = _holder(port)
    owner = f" (held by pid {holder})" if holder else ""
    raise LaunchError(f"port {port} is already in use on this machine{owner}", where=flag,
                      hint="pick another port, or omit --master_port to get a free one")


def _holder(port: int) -> Optional[int]:
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return conn.pid
    except Exception:  # best effort only: other users' sockets are often not visible
        return None
    return None
