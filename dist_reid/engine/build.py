"""A :class:`~dist_reid.engine.trainer.Trainer` from a validated config: the thin layer that
maps config keys onto the library's plain-argument builders and the default hooks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from reid_kernels import BatchLayout
from torch import nn

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
from dist_reid.config import ConfigError, ExperimentConfig, plain_config
from dist_reid.data.pipeline import build_train_pipeline
from dist_reid.data.sampler import build_sampler, check_ids_per_rank
from dist_reid.engine.backend_factory import create_backend
from dist_reid.engine.checkpoint import remove_stale_temporaries
from dist_reid.engine.distributed import TrainingBackend, main_process_first
from dist_reid.engine.fused import make_optimizer, maybe_sync_batchnorm
from dist_reid.engine.hooks import (
    CallbackHook,
    EpochCallback,
    HookBase,
    RunLockHook,
    default_hooks,
)
from dist_reid.engine.run_log import check_trackers, tracker_names
from dist_reid.engine.runlock import RunFolderLocked, acquire_run_lock
from dist_reid.engine.schedules import lr_lambdas
from dist_reid.engine.trainer import Trainer


def build_optimizer(model: nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    """One optimiser group per model lr group (``model.lr_groups()``: name -> (params,
    multiplier)), multipliers overridable by ``optim.lr_mults``; frozen parameters and groups
    with nothing to train skipped."""
    o = cfg.optim
    named = model.lr_groups()  # part of the method contract (check_method)
    unknown = set(o.lr_mults) - set(named)
    if unknown:
        raise ConfigError(
            f"optim.lr_mults: no parameter group {sorted(unknown)}; the model has {sorted(named)}"
        )
    groups = [
        {
            "name": name,
            "params": trainable,
            "lr": cfg.train.lr * o.lr_mults.get(name, mult),
        }
        for name, (params, mult) in named.items()
        # a group a model option switched off (PDM's ``plm``) has nothing to train
        if (trainable := [p for p in params if p.requires_grad])
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


def build_backend(cfg: ExperimentConfig) -> TrainingBackend:
    t = cfg.train
    return create_backend(
        t.backend,
        mixed_precision=t.mixed_precision,
        grad_accum=t.grad_accum,
        deepspeed_config=t.deepspeed_config,
        grad_clip=cfg.optim.grad_clip,
        timeout_s=t.dist_timeout_s,
        init_timeout_s=t.dist_init_timeout_s,
    )


def build_trainer(
    cfg: ExperimentConfig,
    backend: TrainingBackend | None = None,
    callbacks: Sequence[EpochCallback] = (),
    hooks: Sequence[HookBase] | None = None,
) -> Trainer:
    """The trainer ``cfg`` describes. Refuses (before any data is read) a batch with fewer than
    2 identities per rank, missing offline weights and a run folder another run holds.
    ``callbacks`` run after every epoch on every rank (a sweep's report); ``hooks`` replace the
    default ones (a benchmark's timer alone, for example; ``callbacks`` still run)."""
    t = cfg.train
    b = backend or build_backend(cfg)
    try:  # the batch shape needs only the world size: refused before any data is read
        check_ids_per_rank(t.ids_per_batch, b.world_size)
    except ValueError as exc:
        raise ConfigError(f"train.ids_per_batch: {exc}") from None
    check_pretrained(cfg, warn=b.is_main)  # offline without cached weights: fail before data
    trackers = tracker_names(t, warn=b.is_main and hooks is None)
    if hooks is None:
        check_trackers(trackers)  # a tracker that is not installed: every rank, before data
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    # One run per run folder: rank 0 locks it for the run's lifetime (released by the run
    # folder hook or by its death); every rank learns the answer before any data is read.
    locked, refusal = False, None
    if b.is_main:
        try:
            acquire_run_lock(run_dir)
            locked = True
        except RunFolderLocked as exc:
            refusal = str(exc)
    refusal = b.broadcast_object(refusal)
    if refusal is not None:
        raise RunFolderLocked(refusal)
    with main_process_first(b):
        dataset = build_dataset(cfg, generate_missing=b.is_main)
    if b.is_main:
        remove_stale_temporaries(run_dir)  # left by a run killed mid-checkpoint
    labels = dataset.train_labels()
    records = dataset.train
    sampler = build_sampler(
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
    pipeline = build_train_pipeline(
        cfg.data.pipeline,
        records,
        labels,
        sampler,
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
    model = build_model(cfg, num_classes=len(labels))
    # Every local batch is P/W identities x (K + K) (the sampler's layout): losses that take
    # it compute their segment reductions without host syncs.
    layout = BatchLayout(
        t.ids_per_batch // b.world_size, t.instances_per_modality, sampler.infrared_first
    )
    loss = build_loss(cfg, batch_layout=layout)
    check_method(model, loss, cfg)  # the contract, once, before anything relies on it
    model = maybe_sync_batchnorm(model, t.sync_bn)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    # Stepped once per epoch (as both schedules are in their released code); one factor per
    # group because cosine_refine's warm-up start and floor are absolute, not per-multiplier.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambdas(
            base_lrs=[g["lr"] for g in optimizer.param_groups],
            ref_lr=t.lr,
            **schedule_options(cfg),
        ),
    )
    if hooks is None:
        hooks = default_hooks(
            grace_s=t.preempt_grace_s,
            log_every=t.log_every,
            trackers=trackers,
            progress_bar=t.progress_bar,
            run_name=cfg.run.name,
            config=plain_config(cfg),
            checkpoint_every_steps=t.checkpoint_every_steps,
            dataset=dataset,
            plan=evaluation_plan(cfg, dataset),  # what every evaluation of the run scores
            eval_every=t.eval_every,
            callbacks=callbacks,
        )
    else:
        hooks = [*hooks, *(CallbackHook(c) for c in callbacks)]
    if locked:  # whatever the hooks, the lock goes when training ends
        hooks = [*hooks, RunLockHook()]
    return Trainer(
        model,
        loss,
        pipeline,
        optimizer,
        scheduler,
        b,
        hooks,
        epochs=t.epochs,
        max_steps=t.max_steps,
        grad_clip=cfg.optim.grad_clip,
        channels_last=t.channels_last,
        compile=t.compile,
        run_dir=run_dir,
        config=cfg,
        num_classes=len(labels),
    )
