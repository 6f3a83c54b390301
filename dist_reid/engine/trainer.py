"""The one training loop: sampler plan -> pipeline -> model (autocast) -> fp32 losses ->
backend backward/step, with everything else (timing, logging, checkpoints, evaluation,
preemption, sweep reports) in hooks (:mod:`dist_reid.engine.hooks`).

:class:`Trainer` is built from objects; :func:`dist_reid.engine.build.build_trainer` builds one
from a config.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dist_reid.config import (
    ConfigError,
    ExperimentConfig,
    config_changes,
    config_hash,
    describe_changes,
    load_config,
    plain_config,
    save_config,
)
from dist_reid.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dist_reid.engine.distributed import TrainingBackend, peer_failure
from dist_reid.losses.contract import EpochAwareLoss

log = logging.getLogger(__name__)
# What a resume cannot apply over the restored state, --allow-config-change or not.
UNCHANGEABLE_ON_RESUME = ("optim.name", "optim.impl", "train.backend")


SELECTION_METRIC = "mAP"
# One optimiser step's phases, in order: the loop marks the end of each.
PHASES = ("data_wait", "forward", "loss", "backward", "optimizer")


class HookBase:
    """A no-op at every point of the loop; subclasses override what they need."""

    trainer: Trainer

    def on_fit_start(self) -> None:
        """``fit`` has begun; a checkpoint to resume from is not loaded yet."""

    def before_train(self) -> None:
        """After a resume is loaded, before the first step."""

    def before_epoch(self) -> None:
        """The epoch's sampler plan is set; ``trainer.steps_in_epoch`` is known."""

    def before_step(self) -> None:
        """The batch (``trainer.batch``) has arrived."""

    def after_step(self) -> None:
        """The optimiser stepped; ``trainer.step_terms`` holds the step's loss terms."""

    def after_epoch(self) -> None:
        """The epoch is done, its schedule step taken; ``trainer.history[-1]`` is its record."""

    def after_train(self) -> None:
        """The last epoch (or ``max_steps``) is done; not called when training stops early."""

    def close(self) -> None:
        """On every way out of ``fit``: release what the hook holds."""


class PhaseMarks:
    """Per-step phase ends: ``perf_counter`` on CPU; on CUDA, events recorded on the current
    stream and resolved later, so timing adds no host synchronisation. An event phase is the GPU
    time between two marks: ``data_wait`` is the time the GPU idled waiting for the batch."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.steps: list[list[Any]] = []  # [start, end of each phase], unresolved on CUDA
        self._current: list[Any] | None = None

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._current = [self._now()]

    def mark(self) -> None:
        if self._current is not None:
            self._current.append(self._now())

    def finish_step(self) -> None:
        if self._current is not None and len(self._current) == len(PHASES) + 1:
            self.steps.append(self._current)
        self._current = None

    def resolve(self) -> np.ndarray:
        """Seconds per phase for every finished step (rows), and forget them."""
        steps, self.steps = self.steps, []
        if not steps:
            return np.zeros((0, len(PHASES)))
        if self.cuda:
            steps[-1][-1].synchronize()
            return np.array(
                [[a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(s)] for s in steps]
            )
        return np.diff(np.array(steps), axis=1)


def is_best(history: Sequence[dict[str, Any]], record: dict[str, Any]) -> bool:
    scored = [r for r in history if "metrics" in r]
    first = next(iter(record["metrics"]))
    return record["metrics"][first][SELECTION_METRIC] >= max(
        r["metrics"][first][SELECTION_METRIC] for r in scored
    )


def result_summary(history: Sequence[dict[str, Any]], epochs_done: int, steps: int) -> dict:
    """``final_metrics.json``: the last evaluated epoch and the best one (selected on the test
    set, so optimistic, and named so)."""
    scored = [r for r in history if "metrics" in r]
    result: dict[str, Any] = {"epochs_done": epochs_done, "global_step": steps}
    if scored:
        first = next(iter(scored[-1]["metrics"]))
        best = max(scored, key=lambda r: r["metrics"][first][SELECTION_METRIC])
        result["last_epoch"] = {"epoch": scored[-1]["epoch"], "metrics": scored[-1]["metrics"]}
        result["best_epoch_selected_on_test_set_optimistic"] = {
            "epoch": best["epoch"],
            "selected_by": f"{first} {SELECTION_METRIC}",
            "metrics": best["metrics"],
        }
    return result


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; the message names the term, epoch and step."""


class Trainer:
    """Trains ``model`` with ``loss`` on ``pipeline``'s batches: ``epochs`` epochs (or
    ``max_steps`` optimiser steps), the ``scheduler`` stepped once per epoch (as both schedules
    are in their released code). ``backend`` prepares the model and optimiser and runs
    autocast, backward and the step; ``hooks`` do the rest, in order. ``config`` (optional) is
    stored in checkpoints and compared on resume; ``num_classes`` is stored so a checkpoint
    alone rebuilds the model."""

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        pipeline: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        backend: TrainingBackend,
        hooks: Sequence[HookBase] = (),
        *,
        epochs: int,
        max_steps: int = 0,
        grad_clip: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        run_dir: str | Path = ".",
        config: ExperimentConfig | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.backend = backend
        self.loss = loss
        self.pipeline = pipeline
        self.scheduler = scheduler
        self.epochs = epochs
        self.max_steps = max_steps
        self.grad_clip = grad_clip
        self.channels_last = channels_last
        self.run_dir = Path(run_dir)
        self.cfg = config
        self.num_classes = num_classes
        self.model, self.optimizer = backend.prepare(model, optimizer)
        self.forward = torch.compile(self.model) if compile else self.model
        # Batch fields the model names in its contract (e.g. MIP's cameras).
        self.batch_extras = list(backend.unwrap(self.model).batch_fields)
        self.hooks = list(hooks)
        for hook in self.hooks:
            hook.trainer = self
        self.epoch = 0
        self.cursor = 0  # optimiser steps done inside the current epoch
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.steps_in_epoch = 0
        self.batch: dict[str, torch.Tensor] | None = None  # the step's batch, for hooks
        self.step_terms: dict[str, float] = {}  # the last step's loss terms
        self.marks: PhaseMarks | None = None  # set by a timing hook: the loop marks phases
        self.last_report: tuple[int, Any] | None = None  # (epoch, ProtocolReport), rank 0
        self.resumed_record: dict[str, Any] | None = None  # an epoch evaluated on resume
        # set by load() when --allow-config-change applied new values: the checkpoint's config
        self._replaced_config: dict[str, Any] | None = None
        self._config_replaced = False
        self.last_checkpoint: tuple[Path, int] | None = None  # (path, global step): NaN guard

    def call_hooks(self, point: str) -> None:
        for hook in self.hooks:
            getattr(hook, point)()

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.backend.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "backend": self.backend.state_dict(),
            "progress": {
                "epoch": self.epoch,
                "cursor": self.cursor,
                "global_step": self.global_step,
            },
            "rng": self.backend.all_gather_object(rng_state()),
            "history": json.dumps(self.history),
            "world_size": self.backend.world_size,
            **self._identity(),
        }

    def _identity(self) -> dict[str, Any]:
        """What a checkpoint needs to be resumed safely and used alone: the config (compared
        key by key on resume) and the number of classes (rebuilds the model)."""
        if self.cfg is None:
            return {"num_classes": self.num_classes, "config_hash": None}
        return {
            "num_classes": self.num_classes,
            "config_hash": config_hash(self.cfg),
            "config": plain_config(self.cfg),
        }

    def save(self, name: str) -> Path | None:
        state = self.state_dict()  # collective (RNG gather): every rank calls it
        path = None
        if self.backend.is_main:
            path = save_checkpoint(state, self.run_dir / name)
        self.backend.barrier()
        self.last_checkpoint = (self.run_dir / name, self.global_step)
        return path

    def _checkpoint_config(self, path: Path, state: dict[str, Any]) -> dict[str, Any] | None:
        """The config ``state`` was trained with: stored in it, or (a checkpoint of an older
        version) the ``config.yaml`` beside it when that matches its hash; else None."""
        if "config" in state:
            return state["config"]
        beside = path.parent / "config.yaml"
        try:
            written = load_config(beside)
        except (ConfigError, OSError):
            return None
        return plain_config(written) if config_hash(written) == state.get("config_hash") else None

    def _check_config(
        self, path: Path, state: dict[str, Any], allow_change: bool
    ) -> list[tuple[str, Any, Any]] | None:
        """The changes that matter between the checkpoint's config and ours (``None``: unknown,
        only the hashes differ); refused unless ``allow_change``. A trainer built without a
        config compares nothing."""
        if self.cfg is None:
            return []
        old = self._checkpoint_config(path, state)
        if old is not None:
            changes = config_changes(old, plain_config(self.cfg))
            fixed = [c for c in changes if c[0] in UNCHANGEABLE_ON_RESUME]
            if fixed:  # the restored optimiser state belongs to the old optimiser
                raise ConfigError(
                    f"checkpoint {path}: {describe_changes(fixed)} cannot change on resume, even "
                    "with --allow-config-change (the optimiser state is the old optimiser's); "
                    "resume with the old value or start a new run"
                )
            if changes and not allow_change:
                raise ConfigError(
                    f"checkpoint {path} was trained with a different config: "
                    f"{describe_changes(changes)}; resuming would mix the two (the optimiser "
                    "state brings back the old values): resume with the old values, or pass "
                    "--allow-config-change to apply the new ones"
                )
            self._replaced_config = old
            return changes
        if state.get("config_hash") == config_hash(self.cfg):
            return []
        if not allow_change:
            raise ConfigError(
                f"checkpoint {path} stores no config (an older version wrote it) and its config "
                f"hash {state.get('config_hash')} differs from this config's {config_hash(self.cfg)}: "
                "resume with the config it was trained with, or pass --allow-config-change to "
                "apply this one"
            )
        return None

    def _apply_config(self, fresh: list[dict[str, Any]]) -> None:
        """After loading the optimiser and scheduler state, put back what this config says:
        each group's hyper-parameters (weight decay, momentum, ...) and base lr (train.lr x its
        multiplier), the schedule's base lrs, and the lr the schedule gives at this epoch. The
        schedule's shape already is this config's (its functions are never stored)."""
        scheduler = self.scheduler
        groups = self.optimizer.param_groups
        for group, new, factor in zip(groups, fresh, scheduler.lr_lambdas, strict=True):
            group.update({key: value for key, value in new.items() if key != "lr"})
            group["lr"] = new["initial_lr"] * factor(scheduler.last_epoch)
        scheduler.base_lrs = [new["initial_lr"] for new in fresh]
        scheduler._last_lr = [group["lr"] for group in groups]

    def load(self, path: str | Path, allow_config_change: bool = False) -> None:
        """Restore a ``last.pt``. Its stored config is compared with ours (the keys of
        :data:`~dist_reid.config.RESUME_NEUTRAL_KEYS` aside): a difference is refused unless
        ``allow_config_change``, which applies our values over the restored optimiser state."""
        path = Path(path)
        state = load_checkpoint(path, resume=True)
        changes = self._check_config(path, state, allow_config_change)
        fresh = [
            {key: value for key, value in group.items() if key != "params"}
            for group in self.optimizer.param_groups
        ]
        self.backend.unwrap(self.model).load_state_dict(state["model"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:  # a backend's refusal, said of the file
            raise CheckpointError(f"checkpoint {path}: {exc}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.backend.load_state_dict(state["backend"])
        progress = state["progress"]
        self.epoch, self.cursor, self.global_step = (
            progress["epoch"],
            progress["cursor"],
            progress["global_step"],
        )
        self.history = json.loads(state["history"])
        self.last_checkpoint = (Path(path), self.global_step)
        if state["world_size"] == self.backend.world_size:
            set_rng_state(state["rng"][self.backend.rank])
        if changes != []:  # changed (or unknown) and allowed: this config's values win
            self._apply_config(fresh)
            self._config_replaced = True
            applied = {g.get("name", i): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
            log.warning(
                "resuming %s with a changed config (--allow-config-change): %s; lr per group now %s",
                path,
                describe_changes(changes)
                if changes
                else f"unknown changes (config hash {state['config_hash']} -> "
                f"{config_hash(self.cfg)})",
                applied,
            )

    # -- the loop --------------------------------------------------------------------------
    def _mark(self) -> None:
        if self.marks is not None:
            self.marks.mark()

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimiser step (or accumulation micro-step): forward under autocast, fp32 loss
        (architecture decision 7), NaN guard, backward, clipping, step. Marks the end of each
        phase for a timing hook."""
        b = self.backend
        images = batch["images"].to(b.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch["labels"].to(b.device)
        modalities = batch["modalities"].to(b.device)
        extras = {name: batch[name].to(b.device) for name in self.batch_extras}
        with b.accumulate(self.model):
            with b.autocast():
                outputs = self.forward(images, modalities, **extras)
            self._mark()  # forward
            outputs = {k: v.float() for k, v in outputs.items()}
            terms = self.loss(outputs, labels, modalities)
            total = sum(terms.values())
            if not torch.isfinite(total):
                bad = {k: float(v.detach()) for k, v in terms.items() if not torch.isfinite(v)}
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {self.epoch} step {self.cursor} (global step "
                    f"{self.global_step + 1}): {bad or {'total': float(total.detach())}}; "
                    f"{self.describe_last_checkpoint(good=True)}"
                )
            self._mark()  # loss
            b.backward(total)  # accelerate scales by 1/grad_accum itself
            if self.grad_clip:
                b.clip(self.model, self.grad_clip)
            self._mark()  # backward
            b.step(self.optimizer)
            self._mark()  # optimizer
        return {k: float(v.detach()) for k, v in terms.items()} | {"total": float(total.detach())}

    def describe_last_checkpoint(self, good: bool = False) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written yet"
        path, step = self.last_checkpoint
        return f"the last {'good ' if good else ''}checkpoint is {path} (global step {step})"

    def _record_config(self) -> None:
        """``config.yaml`` = this run's config, written once a resume accepted it; a config
        replaced by ``--allow-config-change`` is kept as ``config.previous-<UTC time>.yaml``."""
        if not self.backend.is_main or self.cfg is None:
            return
        if self._config_replaced:
            name = f"config.previous-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.yaml"
            current = self.run_dir / "config.yaml"
            if self._replaced_config is not None:
                save_config(self._replaced_config, self.run_dir, name)
            elif current.is_file():  # an older checkpoint: the config written at its start
                shutil.copyfile(current, self.run_dir / name)
        save_config(self.cfg, self.run_dir)

    def fit(
        self, resume: str | Path | None = None, allow_config_change: bool = False
    ) -> dict[str, Any]:
        """Train to ``epochs`` (or ``max_steps``), from ``resume`` if given; a resume with a
        config that changes what is trained is refused unless ``allow_config_change`` (see
        :meth:`load`). A collective that times out or loses a peer (hung, stopped or dead rank)
        ends the run with one line naming the last checkpoint (SystemExit, 1). Returns the
        run's summary (last and best evaluated epochs)."""
        try:
            return self._fit(resume, allow_config_change)
        except RuntimeError as exc:
            line = peer_failure(exc, self.backend)
            if line is None:
                raise
            raise SystemExit(f"{line}; {self.describe_last_checkpoint()}") from None
        finally:
            self._close()

    def _close(self) -> None:
        """Every hook's ``close`` and the pipeline's, whatever any of them raises: a failing
        tracker must not keep the lock held, the loader running, or turn a preemption's exit
        75 into a crash (the first error is logged; the one in flight, if any, stays)."""
        try:
            for hook in self.hooks:
                try:
                    hook.close()
                except Exception:
                    log.exception("closing %s failed", type(hook).__name__)
        finally:
            # Loader workers stop now, on every way out (a preemption's exit 75 included), not
            # at the interpreter's exit, which SIGTERMs them and makes torch report a dead worker.
            self.pipeline.close()

    def _fit(self, resume: str | Path | None, allow_config_change: bool) -> dict[str, Any]:
        self.call_hooks("on_fit_start")
        if resume is not None:
            self.load(resume, allow_config_change=allow_config_change)
            log.info("resumed from %s at epoch %d step %d", resume, self.epoch, self.cursor)
        self._record_config()
        self.model.train()
        self.call_hooks("before_train")
        stopped = False
        while self.epoch < self.epochs and not stopped:
            self.pipeline.set_epoch(self.epoch)
            if isinstance(self.loss, EpochAwareLoss):  # epoch-gated terms (e.g. MIP's MSEL)
                self.loss.set_epoch(self.epoch)
            self.steps_in_epoch = len(self.pipeline)
            self.call_hooks("before_epoch")
            start = time.perf_counter()
            # closed on every way out (preemption, errors): the loader's workers stop now,
            # from their queue, not from the interpreter's exit (which SIGTERMs them)
            with contextlib.closing(self.pipeline.iterate(self.cursor)) as batches:
                iterator = iter(batches)
                while True:
                    if self.marks is not None:
                        self.marks.start()
                    self.batch = next(iterator, None)
                    if self.batch is None:
                        break
                    self._mark()  # data_wait
                    self.call_hooks("before_step")
                    self.step_terms = self.train_step(self.batch)
                    self.backend.end_setup()  # later collectives get train.dist_timeout_s
                    self.cursor += 1
                    self.global_step += 1
                    self.call_hooks("after_step")
                    if self.max_steps and self.global_step >= self.max_steps:
                        stopped = True
                        break
            self.batch = None
            if stopped and self.cursor < self.steps_in_epoch:
                break  # mid-epoch stop: the checkpoint hook saves this cursor
            self.scheduler.step()
            self.epoch += 1
            self.cursor = 0
            self.history.append({"epoch": self.epoch - 1, "seconds": time.perf_counter() - start})
            self.call_hooks("after_epoch")
        self.call_hooks("after_train")
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return result_summary(self.history, self.epoch, self.global_step)

    def best_state_dict(self) -> dict[str, Any]:
        """Best-epoch weights (with progress, so it is a valid checkpoint to evaluate)."""
        return {
            "model": self.backend.unwrap(self.model).state_dict(),
            "progress": {"epoch": self.epoch},
            **self._identity(),
        }
