"""Preemption and fault injection for the training loop.

Slurm sends SIGUSR1 (``--signal=USR1@T``, or to the batch shell with ``B:``, which turns it into
SIGTERM for the launchers) before it stops a job; torchrun and accelerate forward SIGTERM to
their workers. The handler only sets a flag; the loop asks :meth:`PreemptionHandler.stop_requested`
after every optimiser step, which all-reduces the flag, so every rank sees the same answer at
the same step, checkpoints together and leaves with :data:`PREEMPTED_EXIT_CODE`.

A peer hung inside a collective would keep the others from ever reaching that step boundary, so
the handler also has a deadline: if the checkpoint is not written within ``grace_s`` of the
signal, the rank prints one line and leaves with :data:`PREEMPT_DEADLINE_EXIT_CODE`, without a
checkpoint. The deadline is kept by a thread woken through ``signal.set_wakeup_fd``: Python runs
signal handlers only in the main thread between bytecodes, never while it waits inside a C++
collective, but the wake-up byte is written by the C-level handler at once.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

import torch


class _Group(Protocol):
    """What stop_requested needs of a TrainingBackend."""

    world_size: int
    device: torch.device


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", distinct from crashes (1) and signals
# No checkpoint within the grace period: a failure (not "requeue me"), like a crash.
PREEMPT_DEADLINE_EXIT_CODE = 1
FAULT_STEP_ENV = "DIST_REID_FAULT_KILL_AT_STEP"
FAULT_RANK_ENV = "DIST_REID_FAULT_RANK"


class Preempted(SystemExit):
    """Raised after the preemption checkpoint; uncaught, the process exits with code 75."""

    def __init__(self, global_step: int) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.global_step = global_step


class PreemptionHandler:
    """SIGUSR1/SIGTERM set a flag (nothing else is safe inside a signal handler); with
    ``grace_s``, a deadline thread ends the process if :meth:`uninstall` (called once the
    preemption checkpoint is written) does not come within ``grace_s`` of the first signal.
    ``describe_last`` names the last checkpoint for that line (called from the thread)."""

    def __init__(
        self,
        signals: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM),
        grace_s: float | None = None,
        describe_last: Callable[[], str] | None = None,
    ):
        self.signals = signals
        self.grace_s = grace_s
        self.describe_last = describe_last
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._done = threading.Event()
        self._wakeup: socket.socket | None = None  # write end, owned by the C signal handler
        self._previous_wakeup = -1

    def install(self) -> PreemptionHandler:
        # signal.signal only works in the main thread (e.g. not inside a Ray actor thread).
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            if self.grace_s is not None:
                self._start_deadline_thread()
        return self

    def _start_deadline_thread(self) -> None:
        reader, writer = socket.socketpair()
        writer.setblocking(False)  # set_wakeup_fd requires it (a full buffer drops bytes)
        self._previous_wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._wakeup = writer
        threading.Thread(
            target=self._deadline, args=(reader,), name="preemption-deadline", daemon=True
        ).start()

    def _deadline(self, reader: socket.socket) -> None:
        ours = {int(s) for s in self.signals}
        with reader:
            while True:
                try:
                    data = reader.recv(64)
                except OSError:
                    return
                if not data or self._done.is_set():
                    return  # uninstalled
                signum = next((b for b in data if b in ours), None)
                if signum is not None:
                    break
        if self._done.wait(self.grace_s):
            return  # the checkpoint was written in time
        last = self.describe_last() if self.describe_last else "no checkpoint was written yet"
        line = (
            f"preemption: {signal.Signals(signum).name} received, but the step-boundary "
            f"checkpoint was not written within train.preempt_grace_s={self.grace_s:g} s (a peer "
            f"is likely hung in a collective): exiting without a checkpoint; {last}\n"
        )
        # os.write and os._exit: the main thread may hold any lock (stderr's included) while
        # it waits inside the collective; nothing else would get out.
        os.write(2, b"\n" + line.encode())  # a new line: a progress bar may be half-drawn
        os._exit(PREEMPT_DEADLINE_EXIT_CODE)

    def uninstall(self) -> None:
        self._done.set()  # before anything else: the deadline must not fire after this
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            self._wakeup.close()  # the deadline thread reads EOF and ends
            self._wakeup = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def stop_requested(self, backend: _Group) -> bool:
        """True on every rank as soon as any rank got the signal (a collective: all ranks call
        it at the same step)."""
        flag = torch.tensor([0 if self.received is None else 1], device=backend.device)
        if backend.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def inject_fault(global_step: int, rank: int) -> None:
    """Test hook: SIGKILL this process at ``global_step`` == $DIST_REID_FAULT_KILL_AT_STEP on rank
    $DIST_REID_FAULT_RANK (default 1), in the first incarnation of an elastic job only
    (TORCHELASTIC_RESTART_COUNT 0 or unset), so the restarted group runs through. A no-op unless
    the variable is set."""
    step = os.environ.get(FAULT_STEP_ENV)
    if not step or global_step != int(step):
        return
    if rank != int(os.environ.get(FAULT_RANK_ENV, "1")):
        return
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    os.kill(os.getpid(), signal.SIGKILL)
