"""SaveFolder: the collective, atomic life of one checkpoint folder, shared by every engine's save.

Rank 0 creates `<save_dir>/<tag>.tmp-<token>` (after removing the leftovers of earlier failed saves), every
rank writes its files into it, and every rank learns whether any rank failed: then the folder is removed
and all ranks raise together (`Comm.raise_if_any`), none left waiting in a later collective. Rank 0 then
renames it to `<save_dir>/<tag>` (an existing one is replaced only once the new one is complete) and points
`latest` at it. A reader therefore sees a whole checkpoint or none.

The save directory is rank 0's: ranks that pass another one (a script naming its folder after each rank's
clock) get one warning, as differing tags do, instead of a half checkpoint in each folder.
"""
from __future__ import annotations

import logging
import os
import shutil
import uuid
from typing import Callable, Optional

from dsrun.runtime.checkpoint import layout
from dsrun.runtime.checkpoint.atomic import publish_dir
from dsrun.runtime.checkpoint.errors import CheckpointError

__all__ = ["SaveFolder"]

logger = logging.getLogger("dsrun")


class SaveFolder:
    """One save's temporary folder (`tmp_dir`) and its final name (`final_dir`), agreed by all ranks."""

    def __init__(self, comm, save_dir: str, tag: str, token: str):
        self.comm, self.save_dir, self.tag, self.token = comm, save_dir, tag, token
        self.tmp_dir = os.path.join(save_dir, f"{tag}{layout.TMP_MARK}{token}")
        self.final_dir = os.path.join(save_dir, tag)

    @classmethod
    def open(cls, comm, save_dir: str, tag: str) -> "SaveFolder":
        """Agree on rank 0's save directory and a fresh token, and create the temporary folder (collective)."""
        token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}" if comm.rank == 0 else None
        dirs = comm.all_gather((os.path.abspath(save_dir), token))
        if len({d for d, _ in dirs}) > 1 and comm.rank == 0:
            detail = ", ".join(f"rank {r}: {d!r}" for r, (d, _) in enumerate(dirs))
            logger.warning("save_checkpoint: the save directory is not the same on all ranks (%s); every rank "
                           "saves under rank 0's %r", detail, dirs[0][0])
        folder = cls(comm, dirs[0][0], tag, dirs[0][1])
        error = None
        if comm.rank == 0:
            try:
                os.makedirs(folder.save_dir, exist_ok=True)
                # folders of earlier crashed or failed saves (any tag); safe here: this save's other ranks
                # write nothing before the collective below, and its own temporary folder does not exist yet
                layout.remove_stale(folder.save_dir)
                os.makedirs(folder.tmp_dir)
            except OSError as err:
                error = err
        comm.raise_if_any(error, f"creating {folder.tmp_dir}")
        return folder

    def written(self, error: Optional[BaseException], what: str, value=None) -> list:
        """After every rank wrote its files (`error`: this rank's failure, if any): every rank's `value`,
        or all ranks raise together and the temporary folder is removed."""
        try:
            return self.comm.raise_if_any(error, what, value=value)
        except CheckpointError:
            # every rank has passed the collective, so none is still writing: remove the partial folder
            if self.comm.rank == 0:
                shutil.rmtree(self.tmp_dir, ignore_errors=True)
            raise

    def publish(self, save_latest: bool, last_files: Optional[Callable[[], None]] = None) -> None:
        """Rank 0 writes `last_files()` (its own last files), renames the folder into place and points
        `latest` at it; every rank raises if that failed (collective)."""
        error = None
        if self.comm.rank == 0:
            try:
                if last_files is not None:
                    last_files()
                publish_dir(self.tmp_dir, self.final_dir,
                            os.path.join(self.save_dir, f"{self.tag}{layout.OLD_MARK}{self.token}"))
                if save_latest:
                    layout.write_latest(self.save_dir, self.tag)
            except Exception as err:
                error = err
                shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.comm.raise_if_any(error, f"publishing checkpoint {self.final_dir}")
