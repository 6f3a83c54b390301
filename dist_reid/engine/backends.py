"""The Accelerate backend: DDP (gloo on CPU, NCCL on GPU), autocast bf16/fp16, accumulation.

The interface it implements, and what it shares with the DeepSpeed backend, is in
``distributed.py`` (architecture decision 1); ``backend_factory.create_backend`` builds it.
"""

from __future__ import annotations

import datetime
import os

import torch

from dist_reid.engine.distributed import (
    TrainingBackend,
    launcher_precision,
    resolve_precision,
)


class AccelerateBackend(TrainingBackend):
    """DDP (gloo on CPU, NCCL on GPU), autocast bf16/fp16 with a grad scaler, accumulation.

    Without CUDA the Accelerator must be built with ``cpu=True``: otherwise two launched
    processes each run world size 1 and silently train apart (stack.md section 2), which the
    world-size check below turns into an error.
    """

    name = "accelerate"

    def __init__(
        self,
        mixed_precision: str = "auto",
        grad_accum: int = 1,
        timeout_s: float | None = None,
        init_timeout_s: float | None = None,
    ) -> None:
        """``mixed_precision``: train.mixed_precision; ``auto`` follows ``accelerate launch
        --mixed_precision`` (fp32 without it), an explicit value wins over the launcher."""
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        handlers = []
        if init_timeout_s is not None:
            handlers.append(
                InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=init_timeout_s))
            )
        # Passed explicitly, resolved: Accelerate itself would read the launcher's setting only
        # when given None, so an explicit config value used to hide it silently.
        choice = resolve_precision(mixed_precision, launcher_precision())
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=choice.precision,
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
        # what Accelerate's state says it runs, not what was asked for
        self.precision = str(self.accelerator.mixed_precision)
        self.timeout_s, self.init_timeout_s = timeout_s, init_timeout_s
        self.set_timeout(init_timeout_s)  # also when the group existed already (not ours)
        self.announce_precision(choice)

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

    def barrier(self):
        self.accelerator.wait_for_everyone()
