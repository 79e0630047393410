"""Everything one node's job started: the ranks' process groups, and what left them.

`JobTree` is the agent's view of its processes beyond the ranks it spawns and reaps itself. Where
cgroup v2 is usable, the ranks run in a job cgroup ([Note: job cgroup] in launcher/cgroup.py) and the
tree is simply that cgroup: no descendant can leave it, and one write kills it whole. Elsewhere
([Note: no orphans] in launcher/procs.py) the tree is the ranks' process groups plus the descendants
found outside them: this process becomes a child subreaper so that orphans (a double-forked daemon, a
`setsid` child whose rank exited) re-parent to it rather than to init, `watch()` hands every new
process group among the descendants to the guardian, and `strays()` pins what a teardown must end.

The agent runs the teardown (one shared grace period); `JobTree` signals, tests and kills what is
outside the ranks' own groups, so that no process gets a signal twice. Without a job cgroup, the
children this process had before `start()` are never counted as the job's, but a child that another
thread of this process starts while the job runs would be taken for an adopted orphan (killed and
reaped at the teardown): the agent must be the only one starting processes here, as it is in dsrun.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Callable, Iterable, List, Optional, Set

from dsrun.launcher import cgroup, procs

__all__ = ["JobTree"]


class JobTree:
    """The job cgroup or the process-group fallback, and the guardian behind both."""

    def __init__(self, note: Callable[[str, int], None]):
        self.guardian = procs.Guardian()
        self.cgroup: Optional[cgroup.JobCgroup] = None
        self._note = note
        self._subreaper_was: Optional[bool] = None  # None: not a subreaper (a job cgroup, or refused)
        self._own_children: Set[int] = set()
        self._watched: Set[int] = set()  # process groups of descendants, handed to the guardian

    # ---------------------------------------------------------------- life
    def start(self, job_id: str, node_rank: int, environ) -> None:
        """Create the job cgroup where the system allows it (else become a subreaper); fork the guardian.

        `DSRUN_CGROUP=off` in `environ` forces the fallback.
        """
        self.cgroup, why = cgroup.create_job_cgroup(job_id, node_rank, environ)
        if self.cgroup is not None:
            self._note(f"supervision: job cgroup {self.cgroup.path}", 10)
        else:
            self._note(f"supervision: process groups ({why})", 10)
            self._own_children = set(procs.children(os.getpid()))
            self._subreaper_was = procs.set_child_subreaper(True)
        self.guardian.start(cgroup=self.cgroup.path if self.cgroup else None)

    def close(self) -> None:
        """Remove the job cgroup (killing anything that raced the teardown), end the guardian."""
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None
        self.guardian.close()
        if self._subreaper_was is not None:
            procs.set_child_subreaper(self._subreaper_was)
            self._subreaper_was = None

    def preexec(self, parent_pid: int) -> Callable[[], None]:
        """The ranks' `preexec_fn`: tied to `parent_pid`'s life, and in the job cgroup if there is one."""
        return procs.preexec_tied_to(parent_pid, cgroup_procs=self.cgroup.procs_file if self.cgroup else None)

    @property
    def needs_scans(self) -> bool:
        """True when only `watch()` tells the guardian about processes that left the ranks' groups."""
        return self.cgroup is None

    # ---------------------------------------------------------------- outside the ranks' groups
    def _adopted(self, ranks: Iterable[int]) -> List[int]:
        """Orphans re-parented to this process as subreaper; the exited ones are reaped here, since a
        zombie would keep its process group alive for `procs.group_alive`."""
        if self._subreaper_was is None:  # orphans went to init
            return []
        mine = self._own_children | set(ranks) | {self.guardian.pid}
        adopted = []
        for pid in procs.children(os.getpid()):
            if pid in mine:
                continue
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    continue
            except ChildProcessError:
                continue
            adopted.append(pid)
        return adopted

    def _outside(self, ranks: List[int], live: List[int]) -> List[int]:
        """Descendants of the live ranks, and adopted orphans, that are not in a rank's process group."""
        adopted = self._adopted(ranks)
        found = []
        for pid in adopted + procs.descendants(live + adopted):
            try:
                if os.getpgid(pid) not in ranks:
                    found.append(pid)
            except OSError:
                continue
        return found

    def watch(self, ranks: List[int], live: List[int]) -> None:
        """Hand the guardian every process group a descendant moved into; drop the emptied ones.

        `ranks`: every spawned rank's pid (its process group id); `live`: those not yet reaped.
        """
        for pid in self._outside(ranks, live):
            try:
                pgid = os.getpgid(pid)
            except OSError:
                continue
            if pgid not in self._watched:
                self._watched.add(pgid)
                self.guardian.add(pgid)
                self._note(f"watching process group {pgid} (pid {pid} left its rank's group)", 10)
        for pgid in [g for g in self._watched if not procs.group_alive(g)]:
            self._watched.discard(pgid)
            self.guardian.remove(pgid)

    def strays(self, ranks: List[int], live: List[int]) -> procs.Strays:
        """What a teardown must end besides the ranks' groups (nothing extra with a job cgroup)."""
        return procs.Strays([] if self.cgroup is not None else self._outside(ranks, live))

    def alive(self, ranks: List[int], strays: procs.Strays) -> bool:
        """True while any process of the job is left (not counting zombies)."""
        if self.cgroup is not None:
            # Authoritative, and blind to zombies: a grandchild orphaned to init keeps its process
            # group "alive" until init gets round to reaping it.
            return self.cgroup.populated()
        self._adopted(ranks)  # reaps the exited ones
        return any(procs.group_alive(pgid) for pgid in ranks) or strays.alive()

    def signal_outside(self, ranks: List[int], strays: procs.Strays, sig: int) -> List[int]:
        """`sig` to every process of the job outside the ranks' groups (those get it through killpg);
        returns their pids."""
        if self.cgroup is None:
            strays.signal(sig)
            return strays.pids()
        outside = []
        for pid in self.cgroup.members():
            try:
                if os.getpgid(pid) not in ranks:
                    os.kill(pid, sig)
                    outside.append(pid)
            except OSError:
                continue
        return outside

    def kill_outside(self, ranks: List[int], strays: procs.Strays) -> None:
        """SIGKILL the whole job cgroup (and wait until it is empty) or, without one, the strays and
        the orphans they forked during the grace period."""
        if self.cgroup is not None:
            if not self.cgroup.kill():
                self._note(f"processes of job cgroup {self.cgroup.path} did not die after SIGKILL (D state?)", 40)
            return
        strays.signal(signal.SIGKILL)
        for _ in range(3):  # each round also reaps the previous one's, so an empty round ends it
            late = procs.Strays(self._outside(ranks, []))
            if not late:
                break
            late.signal(signal.SIGKILL)
            late.reap()
            late.close()

    def forget(self, ranks: List[int], timeout: float = 1.0) -> None:
        """Tell the guardian which groups are empty now, so that a recycled id is never signalled.

        With an empty job cgroup every group is done for (only zombies may be left, and an id is not
        recycled while a zombie holds it); otherwise wait a moment for SIGKILLed members to vanish.
        """
        done = self.cgroup is not None and not self.cgroup.populated()
        time_limit = time.monotonic() + timeout
        for pgid in list(ranks) + sorted(self._watched):
            if done:
                self.guardian.remove(pgid)
                continue
            while procs.group_alive(pgid) and time.monotonic() < time_limit:
                self._adopted(ranks)  # our own zombies would keep the group alive
                time.sleep(0.005)
            if not procs.group_alive(pgid):
                self.guardian.remove(pgid)
                self._watched.discard(pgid)
