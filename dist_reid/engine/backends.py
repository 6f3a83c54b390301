"""Training backends behind one small interface (architecture decision 1).

The loop calls ``prepare / accumulate / autocast / backward / clip / step / state_dict /
load_state_dict`` and the collective helpers; it never asks which backend it has.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import importlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def set_group_timeout(seconds: float) -> None:
    """Timeout of every later collective on the default process group (gloo and NCCL).

    torch >= 2.8 has ``torch.distributed.set_timeout``; older releases the private
    ``_set_pg_timeout`` it replaced (same effect)."""
    timeout = datetime.timedelta(seconds=seconds)
    setter = getattr(torch.distributed, "set_timeout", None)
    if setter is None:
        from torch.distributed.distributed_c10d import _set_pg_timeout as setter
    setter(timeout)


class TrainingBackend(abc.ABC):
    name: str
    rank: int
    world_size: int
    device: torch.device
    # Collective timeouts in seconds (None = torch's default, 30 min for gloo): set-up (group,
    # dataset, first step) gets the longer one, every later collective the shorter one.
    timeout_s: float | None = None
    init_timeout_s: float | None = None
    _in_setup: bool = True

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

    @abc.abstractmethod
    def all_gather_object(self, obj: Any) -> list[Any]: ...

    @abc.abstractmethod
    def broadcast_object(self, obj: Any) -> Any: ...

    @abc.abstractmethod
    def barrier(self) -> None: ...

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BN running statistics drift apart per rank after the
        last step): evaluation shards and the saved checkpoint then use one model."""
        if self.world_size == 1:
            return
        for buffer in self.unwrap(model).buffers():
            torch.distributed.broadcast(buffer, src=0)


class AccelerateBackend(TrainingBackend):
    """DDP (gloo on CPU, NCCL on GPU), autocast bf16/fp16 with a grad scaler, accumulation.

    Without CUDA the Accelerator must be built with ``cpu=True``: otherwise two launched
    processes each run world size 1 and silently train apart (stack.md section 2), which the
    world-size check below turns into an error.
    """

    name = "accelerate"

    def __init__(
        self,
        mixed_precision: str = "no",
        grad_accum: int = 1,
        timeout_s: float | None = None,
        init_timeout_s: float | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        handlers = []
        if init_timeout_s is not None:
            handlers.append(
                InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=init_timeout_s))
            )
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=grad_accum,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=handlers,
        )
        expected = int(os.environ.get("WORLD_SIZE", "1"))
        if self.accelerator.num_processes != expected:
            raise RuntimeError(
                f"accelerate sees {self.accelerator.num_processes} process(es) but WORLD_SIZE={expected}: "
                "the processes would train apart"
            )
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.timeout_s, self.init_timeout_s = timeout_s, init_timeout_s
        self.set_timeout(init_timeout_s)  # also when the group existed already (not ours)

    def prepare(self, model, optimizer):
        return self.accelerator.prepare(model, optimizer)

    def accumulate(self, model):
        return self.accelerator.accumulate(model)

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss):
        self.accelerator.backward(loss)

    def clip(self, model, max_norm):
        if self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(model.parameters(), max_norm)

    def step(self, optimizer):
        optimizer.step()  # the prepared optimizer skips steps inside an accumulation window
        optimizer.zero_grad(set_to_none=True)
        return self.accelerator.sync_gradients

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def state_dict(self):
        scaler = self.accelerator.scaler
        return {"scaler": scaler.state_dict()} if scaler is not None else {}

    def load_state_dict(self, state):
        if "scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])

    def all_gather_object(self, obj):
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        self.accelerator.wait_for_everyone()


def create_backend(name: str, **kwargs: Any) -> TrainingBackend:
    from dist_reid.engine.preemption import isolate_elastic_restarts

    isolate_elastic_restarts()  # before any process group exists (torchrun restarts)
    if name == "deepspeed":
        # Looked up by name: the subclass module imports this one, and deepspeed is an extra.
        module = importlib.import_module("dist_reid.engine.deepspeed_backend")
        return module.DeepSpeedBackend(config=kwargs.pop("deepspeed_config", None), **kwargs)
    if name == "accelerate":
        # DeepSpeed-only options; accelerate clips through the loop's clip() call instead.
        kwargs.pop("deepspeed_config", None)
        kwargs.pop("grad_clip", None)
        return AccelerateBackend(**kwargs)
    raise ValueError(f"train.backend: unknown backend {name!r}")


def peer_failure(exc: BaseException, backend: TrainingBackend) -> str | None:
    """One line for a collective that timed out or lost a peer, or None for any other error.

    gloo raises a plain RuntimeError whose message carries gloo's source path ("Timed out
    waiting 10000ms for recv operation", "Connection closed by peer"); NCCL and the store raise
    ``torch.distributed.DistError`` subclasses."""
    text = str(exc)
    dist_error = getattr(torch.distributed, "DistError", ())
    if not (isinstance(exc, dist_error) or "/gloo/" in text):
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
