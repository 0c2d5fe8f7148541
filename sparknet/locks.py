"""File locks: the lab's preparation lock, a run folder's lock, a token store's lock, a study's SQLite lock.

All are flocks on a small file: the kernel releases them when the holder dies (even by SIGKILL), so a crash never
leaves a lock that has to be removed by hand. The lock files themselves stay (empty, or naming the holder).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from sparknet.errors import SparknetError


@contextlib.contextmanager
def exclusive(path: Path, *, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created with its folder), waiting for it. `waiting`: printed once when
    another process holds it, so that a wait is never silent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        if waiting is None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        elif _try(fh):
            print(waiting, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)  # explicitly: a forked child holding the descriptor must not keep it


def prepare_lock(lab: Path):
    """The lab's preparation lock: a run or study preparing the same lab waits, rather than racing on a
    tokenizer or a store."""
    return exclusive(Path(lab) / ".prepare.lock")


def store_lock(directory: Path):
    """One token store's lock: two prepares of the same store take turns (the second says it waits)."""
    return exclusive(Path(directory) / ".lock", waiting=f"waiting for another prepare to finish with {directory} ...")


class RunBusy(SparknetError):
    """The run's folder is held by another process training the same config."""


def _run_lock_path(run_dir: Path) -> Path:
    # Beside the folder, not in it: --fresh deletes the folder, and a lock file deleted while held would let a second
    # process lock a new file of the same name.
    return run_dir.parent / f".{run_dir.name}.lock"


def _try(fh) -> str:
    """Take the lock of open file `fh` without waiting: "" when taken, else who holds it (what the holder wrote)."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        return fh.read().strip() or "another process"
    return ""


def run_busy(run_dir: Path) -> str:
    """Who holds the run folder's lock ("pid 123 on host since 12:00:00"), or "" when nobody does."""
    path = _run_lock_path(run_dir)
    if not path.exists():
        return ""
    with open(path, "a+") as fh:
        holder = _try(fh)
        if not holder:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return holder


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """The run folder's lock, held by the main process for the whole run. Two launches of one config, or a study's
    retry of a trial whose worker is alive but was thought dead, would otherwise train into one folder and
    overwrite each other's checkpoints: the second one fails (`RunBusy`), naming the holder."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(_run_lock_path(run_dir), "a+") as fh:
        holder = _try(fh)
        if holder:
            raise RunBusy(f"{run_dir}: in use by {holder}, which is training this config (fix: wait for it to end, "
                          f"or stop it; a second launch of the same config would overwrite its checkpoints)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%F %T')}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)  # explicitly: a forked child holding the descriptor must not keep it
