"""What every training backend shares: the backend interface, its collective helpers, process
group timeouts, elastic restarts and the one decision of the compute precision.

``backends.py`` (Accelerate) and ``deepspeed_backend.py`` (DeepSpeed ZeRO) both build on this
module and never import each other; ``backend_factory.create_backend`` picks one of them.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime
import importlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# -- precision ------------------------------------------------------------------------------
# The one mapping from a precision name (train.mixed_precision, resolved) to the dtype the
# model computes in; backends, pipelines and benchmarks ask it (or a backend) and nothing else.
PRECISION_DTYPES: dict[str, torch.dtype] = {
    "no": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
# `accelerate launch --mixed_precision X` exports this to its workers (always: "no" when neither
# the flag nor accelerate's config file sets it); torchrun, srun and `deepspeed` leave it unset.
LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
_LAUNCHER = "accelerate launch --mixed_precision"


def precision_dtype(precision: str) -> torch.dtype:
    """``torch.float32`` / ``torch.bfloat16`` / ``torch.float16`` for ``no`` / ``bf16`` / ``fp16``."""
    try:
        return PRECISION_DTYPES[precision]
    except KeyError:
        raise ValueError(
            f"mixed precision {precision!r} is not supported: use one of {sorted(PRECISION_DTYPES)}"
        ) from None


def launcher_precision(environ: Mapping[str, str] | None = None) -> str | None:
    """The precision ``accelerate launch`` asked for (lower case), or None outside it."""
    value = (os.environ if environ is None else environ).get(LAUNCHER_PRECISION_ENV, "").strip()
    return value.lower() or None


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run computes in, what decided it, and a warning when a setting lost."""

    precision: str  # no | bf16 | fp16
    source: str  # e.g. "from train.mixed_precision"
    warning: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return precision_dtype(self.precision)

    def describe(self) -> str:
        return f"mixed precision {self.precision} ({self.source})"


def resolve_precision(configured: str, launcher: str | None) -> PrecisionChoice:
    """``train.mixed_precision`` against the launcher's setting (``launcher_precision()``).

    ``auto`` follows the launcher, and is ``no`` (fp32) without one. An explicit ``no`` / ``bf16``
    / ``fp16`` wins over the launcher, with a warning naming both when they differ.
    """
    if configured == "auto":
        if launcher is None:
            return PrecisionChoice("no", "train.mixed_precision auto, no launcher setting")
        if launcher not in PRECISION_DTYPES:
            raise ValueError(
                f"{LAUNCHER_PRECISION_ENV}={launcher!r} ({_LAUNCHER}) with train.mixed_precision "
                f"auto: only {'|'.join(PRECISION_DTYPES)} are supported; launch with one of them "
                "or set train.mixed_precision"
            )
        return PrecisionChoice(launcher, f"from {_LAUNCHER}")
    precision_dtype(configured)  # one clear error for a value the schema did not vet
    warning = None
    if launcher is not None and launcher != configured:
        warning = (
            f"train.mixed_precision={configured} overrides {_LAUNCHER} {launcher} "
            f"({LAUNCHER_PRECISION_ENV}={launcher}): training in {configured}; set "
            "train.mixed_precision=auto to follow the launcher"
        )
    return PrecisionChoice(configured, "from train.mixed_precision", warning)


# -- process group --------------------------------------------------------------------------
def set_group_timeout(seconds: float) -> None:
    """Timeout of every later collective on the default process group (gloo and NCCL).

    torch >= 2.8 has ``torch.distributed.set_timeout``; older releases the private
    ``_set_pg_timeout`` it replaced (same effect)."""
    timeout = datetime.timedelta(seconds=seconds)
    setter = getattr(torch.distributed, "set_timeout", None)
    if setter is None:
        from torch.distributed.distributed_c10d import _set_pg_timeout as setter
    setter(timeout)


def isolate_elastic_restarts() -> None:
    """Give each torchrun restart its own key space in the agent's store.

    torchrun keeps one TCPStore for the whole job, and the workers' ``env://`` rendezvous reuses
    it without a per-attempt prefix; after a restart the new gloo group reads the dead group's
    peer addresses and fails with "connectFullMesh ... Connection refused". Prefixing the store
    with the restart count (identical on every worker of an attempt) fixes it. A no-op outside
    a restarted torchrun worker.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    # `from torch.distributed import rendezvous` gives the function, not the module.
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    create = rendezvous._create_c10d_store
    if getattr(create, "_dist_reid_prefixed", False):
        return

    def prefixed(*args: Any, **kwargs: Any) -> torch.distributed.Store:
        return torch.distributed.PrefixStore(
            f"/dist_reid/attempt_{attempt}", create(*args, **kwargs)
        )

    prefixed._dist_reid_prefixed = True  # type: ignore[attr-defined]
    rendezvous._create_c10d_store = prefixed


# -- the backend interface ------------------------------------------------------------------
class TrainingBackend(abc.ABC):
    name: str
    rank: int
    world_size: int
    device: torch.device
    # The resolved train.mixed_precision (no | bf16 | fp16); subclasses set it from what really
    # runs (Accelerate's state, DeepSpeed's JSON).
    precision: str = "no"
    # Collective timeouts in seconds (None = torch's default, 30 min for gloo): set-up (group,
    # dataset, first step) gets the longer one, every later collective the shorter one.
    timeout_s: float | None = None
    init_timeout_s: float | None = None
    _in_setup: bool = True

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the model computes in (float32, bfloat16 or float16)."""
        return precision_dtype(self.precision)

    def announce_precision(self, choice: PrecisionChoice) -> None:
        """Log once, on rank 0, which precision runs and what decided it."""
        if not self.is_main:
            return
        if choice.warning:
            log.warning(choice.warning)
        log.info(choice.describe())

    def set_timeout(self, seconds: float | None) -> None:
        if seconds is not None and self.world_size > 1 and torch.distributed.is_initialized():
            set_group_timeout(seconds)

    def end_setup(self) -> None:
        """From now on collectives use ``timeout_s``: a hung peer ends the run after it."""
        if self._in_setup:
            self._in_setup = False
            self.set_timeout(self.timeout_s)

    @contextlib.contextmanager
    def waiting_on_rank_zero(self) -> Iterator[None]:
        """Collectives inside use the set-up timeout: the other ranks wait while rank 0 alone
        works (scores an evaluation), which may take longer than a step."""
        self.set_timeout(self.init_timeout_s)
        try:
            yield
        finally:
            self.set_timeout(self.init_timeout_s if self._in_setup else self.timeout_s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abc.abstractmethod
    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]: ...

    @abc.abstractmethod
    def accumulate(self, model: nn.Module) -> contextlib.AbstractContextManager: ...

    @abc.abstractmethod
    def autocast(self) -> contextlib.AbstractContextManager: ...

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def clip(self, model: nn.Module, max_norm: float) -> None: ...

    @abc.abstractmethod
    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the update if this micro-step closes an accumulation window; True if it did."""

    @abc.abstractmethod
    def unwrap(self, model: nn.Module) -> nn.Module: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @abc.abstractmethod
    def barrier(self) -> None: ...

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BN running statistics drift apart per rank after the
        last step): evaluation shards and the saved checkpoint then use one model."""
        if self.world_size == 1:
            return
        for buffer in self.unwrap(model).buffers():
            torch.distributed.broadcast(buffer, src=0)


def peer_failure(exc: BaseException, backend: TrainingBackend) -> str | None:
    """One line for a collective that timed out or lost a peer, or None for any other error.

    gloo raises a plain RuntimeError whose message carries gloo's source path ("Timed out
    waiting 10000ms for recv operation", "Connection closed by peer"), except for a pair closed
    after a timeout ("Application timeout caused pair closure", no path); NCCL and the store
    raise ``torch.distributed.DistError`` subclasses."""
    text = str(exc)
    dist_error = getattr(torch.distributed, "DistError", ())
    gloo = "/gloo/" in text or "caused pair closure" in text
    if not (isinstance(exc, dist_error) or gloo):
        return None
    detail = text.split("] ", 1)[-1].splitlines()[0].strip() if text else type(exc).__name__
    if "timed out" in text.lower() or "timeout" in text.lower():
        key, seconds = (
            ("train.dist_init_timeout_s", backend.init_timeout_s)
            if backend._in_setup
            else ("train.dist_timeout_s", backend.timeout_s)
        )
        limit = f"{key}={seconds:g} s" if seconds is not None else "the collective timeout"
        what = f"a collective timed out after {limit}: a peer rank is hung, stopped or dead"
    else:
        what = "a peer rank left the process group (crashed, killed or unreachable)"
    return f"rank {backend.rank}: {what} ({detail})"


@contextlib.contextmanager
def main_process_first(backend: TrainingBackend) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a dataset), the others after it finished."""
    if not backend.is_main:
        backend.barrier()
    yield
    if backend.is_main:
        backend.barrier()
