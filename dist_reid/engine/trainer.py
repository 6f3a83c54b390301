"""The one training loop: sampler plan -> pipeline -> model (autocast) -> fp32 losses ->
backend backward/step -> hooks (lr, logging, NaN guard, evaluation, checkpoints)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from reid_kernels import BatchLayout
from torch import nn
from tqdm import tqdm

from dist_reid.builders import (
    augment_options,
    build_dataset,
    build_loss,
    build_model,
    check_method,
    check_pretrained,
    evaluation_plan,
    schedule_options,
)
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
from dist_reid.data.images import ImageDecodeError, header_errors
from dist_reid.data.pipeline import build_train_pipeline
from dist_reid.data.records import Record
from dist_reid.data.sampler import build_sampler, check_ids_per_rank
from dist_reid.engine.backend_factory import create_backend
from dist_reid.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dist_reid.engine.distributed import TrainingBackend, main_process_first, peer_failure
from dist_reid.engine.fused import make_optimizer, maybe_sync_batchnorm
from dist_reid.engine.preemption import Preempted, PreemptionHandler, inject_fault
from dist_reid.engine.runlock import RunFolderLocked, acquire_run_lock, release_run_lock
from dist_reid.engine.schedules import lr_lambdas
from dist_reid.evaluation.features import FeatureCache, extract_features
from dist_reid.evaluation.protocols import run_protocol
from dist_reid.losses.contract import EpochAwareLoss

log = logging.getLogger(__name__)
SELECTION_METRIC = "mAP"
# What a resume cannot apply over the restored state, --allow-config-change or not.
UNCHANGEABLE_ON_RESUME = ("optim.name", "optim.impl", "train.backend")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; the message names the term, epoch and step."""


class Trainer:
    def __init__(
        self,
        cfg: ExperimentConfig,
        backend: TrainingBackend | None = None,
        callbacks: Sequence[Callable[[Trainer, dict[str, Any]], None]] = (),
    ) -> None:
        """``callbacks`` run on every rank after each finished epoch (and its checkpoint) with
        the epoch's record (``epoch``, ``seconds``, ``metrics`` when evaluated): the hook a
        sweep driver uses to report, without the engine knowing about it."""
        self.cfg = cfg
        self.callbacks = list(callbacks)
        t = cfg.train
        self.backend = backend or create_backend(
            t.backend,
            mixed_precision=t.mixed_precision,
            grad_accum=t.grad_accum,
            deepspeed_config=t.deepspeed_config,
            grad_clip=cfg.optim.grad_clip,
            timeout_s=t.dist_timeout_s,
            init_timeout_s=t.dist_init_timeout_s,
        )
        b = self.backend
        try:  # the batch shape needs only the world size: refused before any data is read
            check_ids_per_rank(t.ids_per_batch, b.world_size)
        except ValueError as exc:
            raise ConfigError(f"train.ids_per_batch: {exc}") from None
        check_pretrained(cfg, warn=b.is_main)  # offline without cached weights: fail before data
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        self._locked = False
        # One run per run folder: rank 0 locks it for the run's lifetime (released by finish()
        # or by its death); every rank learns the answer before any data is read.
        refusal = None
        if b.is_main:
            try:
                acquire_run_lock(self.run_dir)
                self._locked = True
            except RunFolderLocked as exc:
                refusal = str(exc)
        refusal = b.broadcast_object(refusal)
        if refusal is not None:
            raise RunFolderLocked(refusal)
        with main_process_first(b):
            self.dataset = build_dataset(cfg, generate_missing=b.is_main)
        if b.is_main:
            remove_stale_temporaries(self.run_dir)  # left by a run killed mid-checkpoint
        self.labels = self.dataset.train_labels()
        self.plan = evaluation_plan(cfg, self.dataset)  # what every evaluation of the run scores
        records = self.dataset.train
        self.sampler = build_sampler(
            cfg.data.sampler,
            [r.pid for r in records],
            [r.modality for r in records],
            t.ids_per_batch,
            t.instances_per_modality,
            num_replicas=b.world_size,
            rank=b.rank,
            seed=cfg.run.seed,
            replacement=cfg.data.sampler_replacement,
            remainder=cfg.data.sampler_remainder,
        )
        self.pipeline = build_train_pipeline(
            cfg.data.pipeline,
            records,
            self.labels,
            self.sampler,
            height=cfg.data.height,
            width=cfg.data.width,
            augment=augment_options(cfg),
            num_workers=cfg.data.num_workers,
            device=b.device,
            seed=cfg.run.seed,
            dali_cache=cfg.data.dali_cache,
            skip_corrupt=cfg.data.skip_corrupt,
            # DALI writes the autocast dtype directly (its images feed the first conv only)
            dtype=b.compute_dtype,
        )
        model = build_model(cfg, num_classes=len(self.labels))
        # Every local batch is P/W identities x (K + K) (the sampler's layout): losses that take
        # it compute their segment reductions without host syncs.
        layout = BatchLayout(
            t.ids_per_batch // b.world_size, t.instances_per_modality, self.sampler.infrared_first
        )
        self.loss = build_loss(cfg, batch_layout=layout)
        check_method(model, self.loss, cfg)  # the contract, once, before anything relies on it
        model = maybe_sync_batchnorm(model, t.sync_bn)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = self._optimizer(model)
        # Stepped once per epoch (as both schedules are in their released code); one factor per
        # group because cosine_refine's warm-up start and floor are absolute, not per-multiplier.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lr_lambdas(
                base_lrs=[g["lr"] for g in optimizer.param_groups],
                ref_lr=cfg.train.lr,
                **schedule_options(cfg),
            ),
        )
        self.model, self.optimizer = b.prepare(model, optimizer)
        self.forward = torch.compile(self.model) if t.compile else self.model
        # Batch fields the model names in its contract (e.g. MIP's cameras).
        self.batch_extras = list(self.backend.unwrap(self.model).batch_fields)
        self.epoch = 0
        self.cursor = 0  # optimiser steps done inside the current epoch
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.writer = None
        if b.is_main and t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._test_records: list[Record] | None = None
        self.last_report: tuple[int, Any] | None = None  # (epoch, ProtocolReport), rank 0
        # set by load() when --allow-config-change applied new values: the checkpoint's config
        self._replaced_config: dict[str, Any] | None = None
        self._config_replaced = False
        self.last_checkpoint: tuple[Path, int] | None = None  # (path, global step): NaN guard

    # -- setup -----------------------------------------------------------------------------
    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """One optimiser group per model lr group (``model.lr_groups()``: name -> (params,
        multiplier)), multipliers overridable by ``optim.lr_mults``; frozen parameters skipped."""
        cfg, o = self.cfg, self.cfg.optim
        named = model.lr_groups()  # part of the method contract (check_method)
        unknown = set(o.lr_mults) - set(named)
        if unknown:
            raise ConfigError(
                f"optim.lr_mults: no parameter group {sorted(unknown)}; the model has {sorted(named)}"
            )
        groups = [
            {
                "name": name,
                "params": [p for p in params if p.requires_grad],
                "lr": cfg.train.lr * o.lr_mults.get(name, mult),
            }
            for name, (params, mult) in named.items()
        ]
        return make_optimizer(
            o.name,
            o.impl,
            groups,
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            momentum=o.momentum,
            nesterov=o.nesterov,
        )

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
            "config_hash": config_hash(self.cfg),
            "config": plain_config(self.cfg),  # what a resume compares, key by key
            "num_classes": len(self.labels),  # rebuilds the model from the file alone
            "world_size": self.backend.world_size,
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
        return plain_config(written) if config_hash(written) == state["config_hash"] else None

    def _check_config(
        self, path: Path, state: dict[str, Any], allow_change: bool
    ) -> list[tuple[str, Any, Any]] | None:
        """The changes that matter between the checkpoint's config and ours (``None``: unknown,
        only the hashes differ); refused unless ``allow_change``."""
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
        if state["config_hash"] == config_hash(self.cfg):
            return []
        if not allow_change:
            raise ConfigError(
                f"checkpoint {path} stores no config (an older version wrote it) and its config "
                f"hash {state['config_hash']} differs from this config's {config_hash(self.cfg)}: "
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

    # -- evaluation ------------------------------------------------------------------------
    def _test_set(self) -> list[Record]:
        """Every test image the evaluation reads, without duplicates (computed once)."""
        if self._test_records is None:
            self._test_records = self.plan.records(self.dataset)
        return self._test_records

    def _shard(self, records: list[Record]) -> list[Record]:
        """This rank's contiguous, unpadded share of ``records``."""
        b = self.backend
        bounds = np.linspace(0, len(records), b.world_size + 1).astype(int)
        return records[bounds[b.rank] : bounds[b.rank + 1]]

    def check_test_images(self) -> None:
        """Open the header of every test image the evaluation will read (each rank a share),
        so a corrupt file is refused before training, not found after a whole epoch."""
        found = self.backend.all_gather_object(
            header_errors([r.path for r in self._shard(self._test_set())])
        )
        count = sum(n for _, n in found)
        if count:
            first = "; ".join(line for lines, _ in found for line in lines[:3])
            raise ImageDecodeError(
                f"test split: {count} unreadable image(s), refused before training: {first} "
                "(replace or restore them; data.skip_corrupt covers training images only)"
            )

    def evaluate(self) -> dict[str, Any]:
        """Features of exactly the test set, one contiguous unpadded shard per rank, gathered;
        rank 0 scores the protocol and broadcasts it, so all ranks leave together."""
        b, plan = self.backend, self.plan
        records = self._test_set()
        shard = self._shard(records)
        b.sync_buffers(self.model)
        model = b.unwrap(self.model)
        feats = None
        if shard:
            with b.autocast():
                feats = extract_features(
                    model,
                    shard,
                    plan.transform(),
                    batch_size=plan.batch_size,
                    device=b.device,
                    flip=plan.flip,
                )
        parts = [p for p in b.all_gather_object(feats) if p is not None]
        summary = None
        if b.is_main:
            cache = FeatureCache.from_arrays([r.path for r in records], np.concatenate(parts))
            report = run_protocol(
                self.dataset,
                cache,
                settings=plan.settings,
                trials=plan.trials,
                max_rank=plan.max_rank,
                **plan.split_options,
            )
            summary = {s.setting: s.mean() for s in report.settings}
            self.last_report = (self.epoch - 1, report)  # metrics.json at the end of the run
        with b.waiting_on_rank_zero():  # rank 0 alone scores the protocol meanwhile
            summary = b.broadcast_object(summary)
        self.model.train()
        return summary

    # -- the loop --------------------------------------------------------------------------
    def _log(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        b, t = self.backend, self.cfg.train
        images = batch["images"].to(b.device, non_blocking=True)
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch["labels"].to(b.device)
        modalities = batch["modalities"].to(b.device)
        extras = {name: batch[name].to(b.device) for name in self.batch_extras}
        with b.accumulate(self.model):
            with b.autocast():
                outputs = self.forward(images, modalities, **extras)
            # Loss math in fp32 (architecture decision 7).
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
            b.backward(total)  # accelerate scales by 1/grad_accum itself
            if self.cfg.optim.grad_clip:
                b.clip(self.model, self.cfg.optim.grad_clip)
            b.step(self.optimizer)
        return {k: float(v.detach()) for k, v in terms.items()} | {"total": float(total.detach())}

    def describe_last_checkpoint(self, good: bool = False) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written yet"
        path, step = self.last_checkpoint
        return f"the last {'good ' if good else ''}checkpoint is {path} (global step {step})"

    def _record_config(self) -> None:
        """``config.yaml`` = this run's config, written once a resume accepted it; a config
        replaced by ``--allow-config-change`` is kept as ``config.previous-<UTC time>.yaml``."""
        if not self.backend.is_main:
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
        """Train to ``train.epochs`` (or ``train.max_steps``), from ``resume`` if given; a
        resume with a config that changes what is trained is refused unless
        ``allow_config_change`` (see :meth:`load`). A collective that times out or loses a peer
        (hung, stopped or dead rank) ends the run with one line naming the last checkpoint
        (SystemExit, 1)."""
        try:
            return self._fit(resume, allow_config_change)
        except RuntimeError as exc:
            line = peer_failure(exc, self.backend)
            if line is None:
                raise
            raise SystemExit(f"{line}; {self.describe_last_checkpoint()}") from None
        finally:
            # Loader workers stop now, on every way out (a preemption's exit 75 included), not
            # at the interpreter's exit, which SIGTERMs them and makes torch report a dead worker.
            self.pipeline.close()

    def _fit(self, resume: str | Path | None, allow_config_change: bool) -> dict[str, Any]:
        b, t = self.backend, self.cfg.train
        if resume is not None:
            self.load(resume, allow_config_change=allow_config_change)
            log.info("resumed from %s at epoch %d step %d", resume, self.epoch, self.cursor)
        self._record_config()
        pending = self._evaluation_pending()
        if pending or self.epoch < t.epochs:
            self.check_test_images()
        self.model.train()
        # SIGUSR1/SIGTERM: checkpoint, exit 75; no checkpoint within the grace period: exit 1
        self.preemption = PreemptionHandler(
            grace_s=t.preempt_grace_s, describe_last=self.describe_last_checkpoint
        ).install()
        if pending:  # the previous run saved this epoch, then failed in its evaluation
            log.info("evaluating epoch %d, saved before its evaluation failed", self.epoch - 1)
            self._evaluate_epoch(self.history[-1])
            for callback in self.callbacks:
                callback(self, self.history[-1])
        stopped = False
        while self.epoch < t.epochs and not stopped:
            self.pipeline.set_epoch(self.epoch)
            if isinstance(self.loss, EpochAwareLoss):  # epoch-gated terms (e.g. MIP's MSEL)
                self.loss.set_epoch(self.epoch)
            steps = len(self.pipeline)
            bar = tqdm(
                total=steps,
                initial=self.cursor,
                desc=f"epoch {self.epoch}",
                disable=not b.is_main,
                leave=False,
            )
            start = time.perf_counter()
            # closed on every way out (preemption, errors): the loader's workers stop now,
            # from their queue, not from the interpreter's exit (which SIGTERMs them)
            with contextlib.closing(self.pipeline.iterate(self.cursor)) as batches:
                for batch in batches:
                    terms = self.train_step(batch)
                    b.end_setup()  # first step done: later collectives get train.dist_timeout_s
                    self.cursor += 1
                    self.global_step += 1
                    bar.update(1)
                    if self.global_step % t.log_every == 0:
                        bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()})
                        self._log(
                            {f"loss/{k}": v for k, v in terms.items()}
                            | {"lr": self.optimizer.param_groups[-1]["lr"]},
                            self.global_step,
                        )
                    if (
                        t.checkpoint_every_steps
                        and self.global_step % t.checkpoint_every_steps == 0
                    ):
                        self.save("last.pt")
                    inject_fault(self.global_step, b.rank)  # no-op unless the test env var is set
                    if self.preemption.stop_requested(b):  # collective: all ranks stop together
                        self.save("last.pt")
                        self.preemption.uninstall()
                        log.warning("preempted: checkpointed at step %d", self.global_step)
                        raise Preempted(self.global_step)
                    if t.max_steps and self.global_step >= t.max_steps:
                        stopped = True
                        break
            bar.close()
            if stopped and self.cursor < steps:
                self.save("last.pt")  # mid-epoch stop: resume continues at this cursor
                break
            seconds = time.perf_counter() - start
            self.scheduler.step()
            self.epoch += 1
            self.cursor = 0
            record: dict[str, Any] = {"epoch": self.epoch - 1, "seconds": seconds}
            self.history.append(record)
            self.save("last.pt")  # before evaluating: a crash there never loses the epoch
            if self._evaluation_due():
                self._evaluate_epoch(record)
            for callback in self.callbacks:
                callback(self, record)
        return self.finish()

    def _evaluation_due(self) -> bool:
        """Whether the epoch just finished (``self.epoch`` done) is evaluated: every
        ``eval_every`` epochs and always the last."""
        t = self.cfg.train
        return self.epoch == t.epochs or bool(t.eval_every and self.epoch % t.eval_every == 0)

    def _evaluation_pending(self) -> bool:
        """A finished epoch that was due for evaluation but has no metrics (its last.pt is
        written before evaluating, so a crash there leaves exactly this)."""
        return (
            self.cursor == 0
            and bool(self.history)
            and self.history[-1]["epoch"] == self.epoch - 1
            and "metrics" not in self.history[-1]
            and self._evaluation_due()
        )

    def _evaluate_epoch(self, record: dict[str, Any]) -> None:
        """Evaluate, then save ``last.pt`` again with the metrics in its history (and
        ``best.pt`` when this epoch scores best)."""
        record["metrics"] = self.evaluate()
        for setting, values in record["metrics"].items():
            self._log({f"eval/{setting}/{k}": v for k, v in values.items()}, self.global_step)
        self.save("last.pt")
        if self._is_best(record) and self.backend.is_main:
            save_checkpoint(self.state_dict_light(), self.run_dir / "best.pt")

    def state_dict_light(self) -> dict[str, Any]:
        """Best-epoch weights (with progress, so it is a valid checkpoint to evaluate)."""
        return {
            "model": self.backend.unwrap(self.model).state_dict(),
            "progress": {"epoch": self.epoch},
            "config": plain_config(self.cfg),
            "num_classes": len(self.labels),
        }

    def _is_best(self, record: dict[str, Any]) -> bool:
        scored = [r for r in self.history if "metrics" in r]
        first = next(iter(record["metrics"]))
        return record["metrics"][first][SELECTION_METRIC] >= max(
            r["metrics"][first][SELECTION_METRIC] for r in scored
        )

    def finish(self) -> dict[str, Any]:
        if getattr(self, "preemption", None) is not None:
            self.preemption.uninstall()
        scored = [r for r in self.history if "metrics" in r]
        result: dict[str, Any] = {"epochs_done": self.epoch, "global_step": self.global_step}
        if scored:
            first = next(iter(scored[-1]["metrics"]))
            best = max(scored, key=lambda r: r["metrics"][first][SELECTION_METRIC])
            result["last_epoch"] = {"epoch": scored[-1]["epoch"], "metrics": scored[-1]["metrics"]}
            result["best_epoch_selected_on_test_set_optimistic"] = {
                "epoch": best["epoch"],
                "selected_by": f"{first} {SELECTION_METRIC}",
                "metrics": best["metrics"],
            }
        if self.backend.is_main:
            (self.run_dir / "final_metrics.json").write_text(json.dumps(result, indent=2))
            if self.last_report is not None:  # the full protocol of the last evaluated epoch
                epoch, report = self.last_report
                payload = {"epoch": epoch, **report.to_dict()}
                (self.run_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
                (self.run_dir / "metrics.md").write_text(
                    f"Epoch {epoch}, mean ± std over trials (%):\n\n{report.to_markdown()}\n"
                )
        if self.writer is not None:
            self.writer.flush()
        if self._locked:
            release_run_lock(self.run_dir)
            self._locked = False
        return result
