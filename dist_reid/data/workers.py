"""Loader worker processes and the stop signals of a job.

Preemption signals reach every process of a job: Slurm signals all processes of a job step
(``scancel --signal=TERM``, a preemption's SIGTERM), torchrun sends its SIGTERM to each worker's
whole process group, and Ctrl-C reaches the terminal's foreground group. A DataLoader worker that
dies of one takes its batches with it: the main process fails on the next batch instead of
reaching its step boundary, so no checkpoint is written. Workers therefore ignore these signals
and leave shutdown to the main process, which checkpoints and then stops them the usual way
(the loader's done event). The one sender they obey is the main process itself: Python's exit
ends daemonic workers it could not stop cleanly with SIGTERM and then waits for them, so a worker
ignoring that would hang the exit. Workers also exit by themselves when the main process is
gone, and SIGKILL (Slurm's KillWait, torchrun's escalation) still ends them.
"""

from __future__ import annotations

import os
import signal
import threading

# The signals the training loop treats as "checkpoint and stop" (and Ctrl-C).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of every DataLoader with workers: SIGTERM, SIGUSR1 and SIGINT from
    anyone but the main process are ignored in the worker (see the module docstring)."""
    if not hasattr(signal, "sigwaitinfo"):  # no sender information (macOS): ignore them all
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        return
    main_pid = os.getppid()
    # Blocked in this thread and in every thread started from now on; the watcher takes them
    # off the queue one by one and learns the sender. The default action (not the main
    # process's inherited handlers) is what a signal from the main process then does.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    threading.Thread(target=_watch, args=(main_pid,), name="stop-signal-watch", daemon=True).start()


def _watch(main_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_pid == main_pid:  # the main process stops us: die of it as before
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [info.si_signo])
            os.kill(os.getpid(), info.si_signo)
            return
