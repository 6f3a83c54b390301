"""One run per run folder: rank 0 holds an exclusive lock on ``<run dir>/run.lock`` for the run's
lifetime, so a second run with the same ``run.name`` is refused instead of overwriting the
first one's checkpoints and config.

The lock is a POSIX record lock (``fcntl.lockf``) on a descriptor kept open: the kernel (or the
NFS lock manager) drops it when the holder dies however it dies, so a killed run's lock is free
at once and a torchrun restart or a Slurm requeue takes it over; the file's record of the holder
(host, pid, start time, Slurm job) is only for the message. Record locks are not inherited by
forked children, so a data loader worker that outlives a killed run cannot keep its folder
locked (a ``flock`` would be shared with them). The file is never deleted: a run that unlinked
it could leave a waiter locking a file no longer in the folder while a third run creates a new
one. A clean end empties it instead.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from dist_reid.engine.checkpoint import pid_alive

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
# Errors of file systems without record locks (some Lustre and old NFS mounts): the record alone
# then decides, which can only tell a live holder on this host (or a requeue of the same job).
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
# Locks this process holds: path -> [descriptor, holders]. Closing any descriptor of the file
# would drop a record lock, so a second Trainer of the same folder in this process re-enters.
_HELD: dict[str, list[int]] = {}


class RunFolderLocked(RuntimeError):
    """Another live run holds the run folder; the message names it (host, pid, start time)."""


def _record() -> dict[str, Any]:
    record: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if os.environ.get("SLURM_JOB_ID"):
        record["slurm_job"] = os.environ["SLURM_JOB_ID"]
    return record


def _read(fd: int) -> dict[str, Any] | None:
    raw = os.pread(fd, 4096, 0)
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return {"host": "?", "pid": "?", "started": "?"}  # not ours, or half written
    return record if isinstance(record, dict) else None


def _describe(record: dict[str, Any] | None) -> str:
    if record is None:
        return "holder not recorded yet"
    text = f"host {record.get('host')}, pid {record.get('pid')}, started {record.get('started')}"
    if record.get("slurm_job"):
        text += f", Slurm job {record['slurm_job']}"
    return text


def _stale_without_locks(record: dict[str, Any] | None) -> bool:
    """Without record locks: may ``record``'s run be taken over?"""
    if record is None:
        return True
    if record.get("host") == socket.gethostname():
        pid = record.get("pid")
        return not isinstance(pid, int) or pid == os.getpid() or not pid_alive(pid)
    job = os.environ.get("SLURM_JOB_ID")
    return bool(job) and record.get("slurm_job") == job  # a requeue: the old step is gone


def acquire_run_lock(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Lock ``folder`` for this process (creating it). Returns the record of a dead holder whose
    lock was taken over (None if there was none, or this process holds it already). Raises
    :class:`RunFolderLocked` naming the holder if a live run holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = os.path.realpath(path)
    if key in _HELD:
        try:
            same = os.path.samestat(os.fstat(_HELD[key][0]), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            _HELD[key][1] += 1
            return None
        os.close(_HELD.pop(key)[0])  # the folder was deleted and made anew: lock the new file
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise RunFolderLocked(_refusal(folder, _read_settled(fd))) from None
            if exc.errno not in _NO_LOCKS:
                raise
            previous = _read(fd)
            if not _stale_without_locks(previous):
                raise RunFolderLocked(
                    _refusal(folder, previous)
                    + f" (this file system has no locks: if that run is gone, delete {path})"
                ) from None
            log.warning("no file locks on %s: the run folder lock is advisory only", folder)
        previous = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_record()).encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = [fd, 1]
    if previous is not None:
        log.warning(
            "took over the run folder %s from a run that is gone (%s)", folder, _describe(previous)
        )
    return previous


def _read_settled(fd: int) -> dict[str, Any] | None:
    """The holder's record; a holder that has just taken the lock writes it right after."""
    for _ in range(10):
        record = _read(fd)
        if record is not None:
            return record
        time.sleep(0.1)
    return None


def _refusal(folder: Path, record: dict[str, Any] | None) -> str:
    return (
        f"run folder {folder} is in use by another run ({_describe(record)}): wait for it to "
        "end or give this run another run.name"
    )


def release_run_lock(folder: str | os.PathLike[str]) -> None:
    """Undo one :func:`acquire_run_lock` of this process; the last one empties the record (a
    clean end leaves nothing to take over) and drops the lock."""
    key = os.path.realpath(Path(folder) / LOCK_NAME)
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[key]
    try:
        os.ftruncate(held[0], 0)
    finally:
        os.close(held[0])


def lock_holder(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record in ``folder``'s lock file (None when empty or absent). Reads it through a held
    descriptor when this process holds the lock: closing a second one would drop the lock."""
    path = Path(folder) / LOCK_NAME
    held = _HELD.get(os.path.realpath(path))
    if held is not None:
        return _read(held[0])
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        return _read(fd)
    finally:
        os.close(fd)
