"""Whole-state checkpoints, written atomically and read with ``weights_only=True``.

A checkpoint holds only tensors and plain containers, so loading one never runs code from the
file (a pickled object in it is refused). ``best.pt`` holds the weights only: it is for
evaluation and export, ``last.pt`` is the one to resume from.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

# What ``Trainer.load`` reads besides the weights; ``best.pt`` has only "model" and "progress".
RESUME_KEYS = ("optimizer", "scheduler", "backend", "history", "config_hash", "world_size", "rng")
# A temporary of another host's writer can't be checked by pid: removed once untouched this long
# (a live ``torch.save`` keeps writing, so an hour without a byte is an abandoned file).
FOREIGN_TEMPORARY_AGE_S = 3600
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not ours; the message names the file."""


def _temporary_path(path: Path) -> Path:
    # host and pid: a later start can tell a dead writer's leftover from a live write
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a crash
    mid-write leaves the previous checkpoint intact (and a kill leaves a temporary that
    ``remove_stale_temporaries`` clears at the next start)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` of this host exists (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the ``.<name>.tmp-<host>-<pid>`` files that ``save_checkpoint`` left when its
    process was killed mid-write. Only safe ones go: this host's whose pid is dead (or the
    pid-only name of older versions, taken as this host's), and another host's untouched for
    ``FOREIGN_TEMPORARY_AGE_S``. A live write, ours or a peer's, is never touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host, removed = socket.gethostname(), []
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match is None or not entry.is_file():
            continue
        try:
            if match["host"] in (None, host):
                stale = int(match["pid"]) != os.getpid() and not pid_alive(int(match["pid"]))
            else:
                stale = time.time() - entry.stat().st_mtime > FOREIGN_TEMPORARY_AGE_S
            if stale:
                entry.unlink()
                removed.append(entry)
        except FileNotFoundError:  # its writer renamed it meanwhile
            continue
    if removed:
        log.info("removed %d stale checkpoint temporaries in %s", len(removed), folder)
    return removed


def read_model_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint or a plain state dict, read safely (``weights_only=True``); every failure is
    one ``CheckpointError`` line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes: an interrupted copy or a full disk?)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) and "eights only load failed" in str(exc):
            # torch's message advises the unsafe load, exactly what must not be done here
            raise CheckpointError(
                f"checkpoint {path} holds pickled Python objects, refused (loading them could "
                "run code); dist-reid checkpoints hold tensors and plain values only"
            ) from None
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt): {first}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds no dict of tensors ({type(state).__name__})"
        )
    return state


def load_checkpoint(path: str | os.PathLike[str], *, resume: bool = False) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``). ``resume=True`` also requires the
    whole training state, so a weights-only ``best.pt`` is refused with a pointer to
    ``last.pt``. Every failure is one ``CheckpointError`` line naming the file."""
    path = Path(path)
    state = read_model_file(path)
    if not isinstance(state, dict) or "model" not in state or "progress" not in state:
        raise CheckpointError(f"checkpoint {path} is not a dist-reid training checkpoint")
    if resume:
        missing = [key for key in RESUME_KEYS if key not in state]
        if "optimizer" in missing:
            raise CheckpointError(
                f"checkpoint {path} is a weights-only file (like best.pt: for eval and export), "
                f"not a training state: resume from {path.parent / 'last.pt'}"
            )
        if missing:
            raise CheckpointError(
                f"checkpoint {path} is not a complete training state (no {', '.join(missing)})"
            )
    return state


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
