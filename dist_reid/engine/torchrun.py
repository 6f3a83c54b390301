"""torchrun that exits with code 75 when its workers were preempted.

    python -m dist_reid.engine.torchrun --nproc_per_node 2 launch/train.py -c CONFIG ...

takes torchrun's own arguments and runs torchrun's own ``main`` unchanged. torchrun reports a
worker's non-zero exit as a failure (exit 1), and when the agent is signalled itself (SIGTERM
from Slurm, a process-group kill) it forwards the signal to the workers, waits for them up to its
shutdown timeout and again exits 1. A preempted group, where every worker checkpointed and left
with :data:`PREEMPTED_EXIT_CODE`, then looks like a crash to a script or scheduler that requeues
on 75. This wrapper reads the exit codes torchrun's agent collected when it shut its workers down
and exits 75 if all of this node's workers exited 75; any other outcome is torchrun's own.

It also adds SIGUSR1 to the signals the agent forwards (torchrun's ``--signals-to-handle``, whose
default leaves SIGUSR1 to kill the agent), so ``scancel --signal=USR1`` of a job step, or
``--signal=USR1@T`` without ``B:``, checkpoints like SIGTERM does; and once the agent has got one
stop signal it ignores repeats while its workers checkpoint and leave (``srun
--kill-on-bad-exit=1`` signals the step again as soon as the first node's launcher exits 75).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from dist_reid.engine.preemption import PREEMPTED_EXIT_CODE

# torchrun's --signals-to-handle defaults to $PET_SIGNALS_TO_HANDLE, and the agent handles what
# it finds in $TORCHELASTIC_SIGNALS_TO_HANDLE (set from that option).
SIGNALS_OPTION_ENV = "PET_SIGNALS_TO_HANDLE"
SIGNALS_ENV = "TORCHELASTIC_SIGNALS_TO_HANDLE"
# torchrun's default set, plus the preemption warning Slurm sends.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def _record_worker_exit_codes(codes: dict[int, int | None]) -> None:
    """After each shutdown of a worker group, keep its workers' exit codes in ``codes`` (the
    last group's survive: a restart shuts the previous group down first)."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    shutdown = LocalElasticAgent._shutdown

    def recording(self: Any, *args: Any, **kwargs: Any) -> None:
        shutdown(self, *args, **kwargs)
        handlers = getattr(getattr(self, "_pcontext", None), "subprocess_handlers", None)
        if handlers:
            codes.clear()
            codes.update({rank: h.proc.poll() for rank, h in handlers.items()})

    LocalElasticAgent._shutdown = recording  # type: ignore[method-assign]


def _ignore_repeated_stop_signals() -> None:
    """After its first stop signal the agent is already shutting its workers down, and they
    checkpoint before they leave. A repeat (Slurm ending the step because another node's
    launcher has already left with 75, a second scancel) would break that wait with a new
    SignalException and abandon them; from the first signal on, repeats are ignored (torchrun
    still SIGKILLs workers that outlast its shutdown timeout)."""
    from torch.distributed.elastic.multiprocessing import api

    first = api._terminate_process_handler

    def once(signum: int, frame: FrameType | None) -> None:
        for name in os.environ.get(SIGNALS_ENV, FORWARDED_SIGNALS).split(","):
            sig = getattr(signal, name.strip(), None)
            if isinstance(sig, signal.Signals):
                signal.signal(sig, signal.SIG_IGN)
        first(signum, frame)

    # PContext.start installs the handler by this module-level name when it starts workers.
    api._terminate_process_handler = once


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    os.environ.setdefault(SIGNALS_OPTION_ENV, FORWARDED_SIGNALS)  # --signals-to-handle wins
    codes: dict[int, int | None] = {}
    _record_worker_exit_codes(codes)
    _ignore_repeated_stop_signals()
    try:
        torchrun_main(list(sys.argv[1:] if argv is None else argv))
    except (ChildFailedError, SignalException):
        if codes and all(code == PREEMPTED_EXIT_CODE for code in codes.values()):
            print(
                f"torchrun: all {len(codes)} local workers were preempted and checkpointed "
                f"(exit {PREEMPTED_EXIT_CODE})",
                file=sys.stderr,
            )
            return PREEMPTED_EXIT_CODE
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
