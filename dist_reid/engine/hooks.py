"""What the training loop does besides training: each concern is a hook (the interface,
:class:`HookBase`, lives with the loop in :mod:`dist_reid.engine.trainer`).

The loop (:class:`~dist_reid.engine.trainer.Trainer`) calls every hook, in the order given, at
``on_fit_start`` (before a resume is loaded), ``before_train``, ``before_epoch``, ``before_step``, ``after_step``, ``after_epoch`` and
``after_train`` (the names of fast-reid's ``HookBase``), and ``close`` on every way out of
``fit`` (errors and preemption included). A hook reads and changes the trainer it is attached
to (``self.trainer``); hooks never call each other.

Order matters where one hook's result is another's input; :func:`default_hooks` gives the order
a training run uses: checkpoints, preemption, evaluation, logging, the sweep callback, the run
folder's results (and, added by the builder, the run lock's release). The benchmarks add
:class:`TimerHook`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dist_reid.data.images import ImageDecodeError, header_errors
from dist_reid.data.records import Record
from dist_reid.engine.checkpoint import save_checkpoint
from dist_reid.engine.preemption import Preempted, PreemptionHandler, inject_fault
from dist_reid.engine.run_log import (
    MetricTrackers,
    close_run_log,
    epoch_line,
    evaluation_lines,
    mean_across_ranks,
    open_run_log,
    tqdm_disable,
)
from dist_reid.engine.runlock import release_run_lock
from dist_reid.engine.trainer import (
    PHASES,
    SELECTION_METRIC,
    HookBase,
    PhaseMarks,
    Trainer,
    is_best,
    result_summary,
)
from dist_reid.evaluation.features import FeatureCache, extract_features
from dist_reid.evaluation.protocols import EvaluationPlan, run_protocol

log = logging.getLogger(__name__)


# -- timing ----------------------------------------------------------------------------------
class TimerHook(HookBase):
    """Seconds per phase (data wait, forward, loss, backward, optimiser) and images per second
    of every step after the first ``warmup_steps`` of the run, on this rank. The loop itself
    marks the phases (``trainer.marks``), so what is timed is the loop as it runs."""

    def __init__(self, warmup_steps: int = 0) -> None:
        self.warmup_steps = warmup_steps
        self.seconds = np.zeros(len(PHASES))
        self.steps = 0
        self.images = 0
        self._seen = 0
        self._images: list[int] = []

    def before_train(self) -> None:
        self.marks = PhaseMarks(self.trainer.backend.device)
        self.trainer.marks = self.marks
        if self.marks.cuda:
            torch.cuda.reset_peak_memory_stats(self.trainer.backend.device)

    def before_step(self) -> None:
        self._seen += 1
        if self._seen <= self.warmup_steps:  # compilation, allocator and loader warm-up
            self.trainer.marks = None

    def after_step(self) -> None:
        if self.trainer.marks is None:
            self.trainer.marks = self.marks
            return
        self.marks.finish_step()
        self._images.append(len(self.trainer.batch["images"]))
        if len(self.marks.steps) >= 256:  # bound the unresolved CUDA events
            self._resolve()

    def _resolve(self) -> None:
        rows = self.marks.resolve()
        self.seconds += rows.sum(axis=0)
        self.steps += len(rows)
        self.images += sum(self._images[: len(rows)])
        self._images = self._images[len(rows) :]

    def after_epoch(self) -> None:
        self._resolve()

    def after_train(self) -> None:
        self._resolve()

    def summary(self) -> dict[str, Any]:
        """Images per second over the timed steps and milliseconds per phase per step."""
        self._resolve()
        device = self.trainer.backend.device
        total = float(self.seconds.sum())
        return {
            "timed_steps": self.steps,
            "images_per_s": self.images / total if total else float("nan"),
            "images_per_step": self.images / self.steps if self.steps else float("nan"),
            **{
                f"{name}_ms": 1000 * s / self.steps if self.steps else float("nan")
                for name, s in zip(PHASES, self.seconds, strict=True)
            },
            "timing": "cuda events" if self.marks.cuda else "perf_counter",
            "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20
            if device.type == "cuda"
            else None,
        }


# -- preemption ------------------------------------------------------------------------------
class PreemptionHook(HookBase):
    """SIGUSR1/SIGTERM: checkpoint ``last.pt`` at the next step boundary, on every rank
    together, and leave with exit 75; no checkpoint within ``grace_s``: exit 1."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.handler: PreemptionHandler | None = None

    def before_train(self) -> None:
        self.handler = PreemptionHandler(
            grace_s=self.grace_s, describe_last=self.trainer.describe_last_checkpoint
        ).install()

    def after_step(self) -> None:
        t, b = self.trainer, self.trainer.backend
        inject_fault(t.global_step, b.rank)  # no-op unless the test env var is set
        if self.handler.stop_requested(b):  # collective: all ranks stop at the same step
            t.save("last.pt")
            self.handler.uninstall()
            log.warning("preempted: checkpointed at step %d", t.global_step)
            raise Preempted(t.global_step)

    def close(self) -> None:
        if self.handler is not None:
            self.handler.uninstall()
            self.handler = None


# -- checkpoints -----------------------------------------------------------------------------
class CheckpointHook(HookBase):
    """``last.pt`` every ``every_steps`` steps (0: never mid-epoch), at every epoch end (before
    its evaluation, so a crash there never loses the epoch) and when ``max_steps`` stops the
    run mid-epoch (a resume continues at that step)."""

    def __init__(self, every_steps: int = 0) -> None:
        self.every_steps = every_steps

    def after_step(self) -> None:
        t = self.trainer
        if self.every_steps and t.global_step % self.every_steps == 0:
            t.save("last.pt")

    def after_epoch(self) -> None:
        self.trainer.save("last.pt")

    def after_train(self) -> None:
        if self.trainer.cursor:  # stopped by max_steps inside an epoch
            self.trainer.save("last.pt")


# -- evaluation ------------------------------------------------------------------------------
class EvaluationHook(HookBase):
    """Scores ``plan`` every ``every`` epochs and after the last: features of exactly the test
    set, one contiguous unpadded shard per rank, gathered; rank 0 scores the protocol and
    broadcasts the summary. Then ``last.pt`` is saved again with the metrics in its history,
    and ``best.pt`` when the epoch scores best. Before training, every test image's header is
    read (each rank a share), and an epoch saved before its evaluation failed is evaluated."""

    def __init__(self, dataset: Any, plan: EvaluationPlan, every: int) -> None:
        self.dataset = dataset
        self.plan = plan
        self.every = every
        self._records: list[Record] | None = None

    def test_set(self) -> list[Record]:
        """Every test image the evaluation reads, without duplicates (computed once)."""
        if self._records is None:
            self._records = self.plan.records(self.dataset)
        return self._records

    def _shard(self, records: list[Record]) -> list[Record]:
        b = self.trainer.backend
        bounds = np.linspace(0, len(records), b.world_size + 1).astype(int)
        return records[bounds[b.rank] : bounds[b.rank + 1]]

    def due(self, epochs_done: int) -> bool:
        return epochs_done == self.trainer.epochs or bool(
            self.every and epochs_done % self.every == 0
        )

    def pending(self) -> bool:
        """A finished epoch that was due but has no metrics (its last.pt is written before
        evaluating, so a crash there leaves exactly this)."""
        t = self.trainer
        return (
            t.cursor == 0
            and bool(t.history)
            and t.history[-1]["epoch"] == t.epoch - 1
            and "metrics" not in t.history[-1]
            and self.due(t.epoch)
        )

    def check_test_images(self) -> None:
        found = self.trainer.backend.all_gather_object(
            header_errors([r.path for r in self._shard(self.test_set())])
        )
        count = sum(n for _, n in found)
        if count:
            first = "; ".join(line for lines, _ in found for line in lines[:3])
            raise ImageDecodeError(
                f"test split: {count} unreadable image(s), refused before training: {first} "
                "(replace or restore them; data.skip_corrupt covers training images only)"
            )

    def before_train(self) -> None:
        t = self.trainer
        pending = self.pending()
        if pending or t.epoch < t.epochs:
            self.check_test_images()
        if pending:
            log.info("evaluating epoch %d, saved before its evaluation failed", t.epoch - 1)
            self._evaluate_epoch(t.history[-1])
            t.resumed_record = t.history[-1]

    def after_epoch(self) -> None:
        if self.due(self.trainer.epoch):
            self._evaluate_epoch(self.trainer.history[-1])

    def evaluate(self) -> dict[str, dict[str, float]]:
        t, b, plan = self.trainer, self.trainer.backend, self.plan
        records = self.test_set()
        shard = self._shard(records)
        b.sync_buffers(t.model)
        model = b.unwrap(t.model)
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
            t.last_report = (t.epoch - 1, report)  # metrics.json at the end of the run
        with b.waiting_on_rank_zero():  # rank 0 alone scores the protocol meanwhile
            summary = b.broadcast_object(summary)
        t.model.train()
        return summary

    def _evaluate_epoch(self, record: dict[str, Any]) -> None:
        t = self.trainer
        record["metrics"] = self.evaluate()
        t.save("last.pt")
        if is_best(t.history, record) and t.backend.is_main:
            save_checkpoint(t.best_state_dict(), t.run_dir / "best.pt")


# -- logging ---------------------------------------------------------------------------------
# Epoch lines and evaluation tables: the run's results, printed to stdout by rank 0 and written
# to train.log; not propagated to the console handler (stderr), so they appear once.
RESULTS = logging.getLogger("dist_reid.results")
RESULTS.propagate = False


class LoggingHook(HookBase):
    """What a batch log shows: one line per epoch (losses averaged over the epoch and the ranks,
    lr, images/s, time, ETA) and the evaluation table when one runs, on stdout and in
    ``<run>/train.log`` (rank 0); metric trackers (``train.trackers``) get the rank-mean loss
    terms and lr every ``every_steps`` steps and every evaluation; a progress bar only on a
    terminal, or when ``progress_bar`` asks. Every rank takes part in the cross-rank means."""

    def __init__(
        self,
        every_steps: int,
        trackers: Sequence[str] = ("tensorboard",),
        progress_bar: str | bool = "auto",
        run_name: str = "run",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.every_steps = every_steps
        self.tracker_names = tuple(trackers)
        self.progress_bar = progress_bar
        self.run_name = run_name
        self.config = config
        self.trackers: MetricTrackers | None = None
        self.file: logging.Handler | None = None
        self.bar: tqdm | None = None
        self.epoch_seconds: list[float] = []
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.images = 0

    def report(self, line: str) -> None:
        """A result line: stdout and train.log, rank 0 only."""
        if self.trainer.backend.is_main:
            print(line, flush=True)
            RESULTS.info(line)

    def _evaluation(self, record: dict[str, Any]) -> None:
        metrics = record["metrics"]
        self.report(f"evaluation of epoch {record['epoch'] + 1} (%, mean over trials):")
        for line in evaluation_lines(metrics):
            self.report(f"  {line}")
        for setting, values in metrics.items():
            self.trackers.log(
                {f"eval/{setting}/{k}": v for k, v in values.items()}, self.trainer.global_step
            )

    def on_fit_start(self) -> None:
        """``train.log`` and the trackers, before a resume is loaded (its lines belong in the
        log). Only rank 0 opens them; its failure is broadcast, so every rank stops with it
        instead of waiting in the first step's collectives."""
        t = self.trainer
        main = t.backend.is_main
        error = None
        try:
            if main:
                self.file = open_run_log(t.run_dir)
                RESULTS.addHandler(self.file)
                RESULTS.setLevel(logging.INFO)
            self.trackers = MetricTrackers(
                self.tracker_names, t.run_dir, run_name=self.run_name, enabled=main
            )
            if self.config is not None:
                self.trackers.log_config(self.config)
        except Exception as exc:
            error = f"rank {t.backend.rank}: the run's logs could not be opened: {exc}"
        errors = [e for e in t.backend.all_gather_object(error) if e is not None]
        if errors:
            raise RuntimeError(errors[0])

    def before_train(self) -> None:
        t = self.trainer
        log.info(
            "training %s: %d epochs, from epoch %d step %d",
            t.run_dir,
            t.epochs,
            t.epoch,
            t.cursor,
        )
        if t.resumed_record is not None:
            self._evaluation(t.resumed_record)

    def before_epoch(self) -> None:
        t = self.trainer
        self._reset()
        # The epoch line reports the lr this epoch trained at: after_epoch runs once the
        # scheduler has stepped to the next epoch's.
        self.epoch_lr = t.optimizer.param_groups[-1]["lr"]
        self.bar = tqdm(
            total=t.steps_in_epoch,
            initial=t.cursor,
            desc=f"epoch {t.epoch}",
            disable=tqdm_disable(self.progress_bar, t.backend.is_main),
            leave=False,
        )

    def after_step(self) -> None:
        t = self.trainer
        self.bar.update(1)
        for key, value in t.step_terms.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1
        self.images += len(t.batch["images"])
        if t.global_step % self.every_steps == 0:
            means = mean_across_ranks(t.step_terms, t.backend.device)  # collective
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})
            self.trackers.log(
                {f"loss/{k}": v for k, v in means.items()}
                | {"lr": t.optimizer.param_groups[-1]["lr"]},
                t.global_step,
            )

    def after_epoch(self) -> None:
        t = self.trainer
        self._close_bar()
        record = t.history[-1]
        losses = mean_across_ranks(  # collective
            {k: v / self.steps for k, v in self.sums.items()} if self.steps else {},
            t.backend.device,
        )
        seconds = record["seconds"]
        self.epoch_seconds.append(seconds)
        mean_epoch = sum(self.epoch_seconds) / len(self.epoch_seconds)
        images_per_s = self.images * t.backend.world_size / seconds if seconds else 0.0
        self.report(
            epoch_line(
                epoch=t.epoch,
                epochs=t.epochs,
                steps=self.steps,
                losses=losses,
                lr=self.epoch_lr,
                images_per_s=images_per_s,
                seconds=seconds,
                eta_s=mean_epoch * (t.epochs - t.epoch),
            )
        )
        self.trackers.log({"train/images_per_s": images_per_s}, t.global_step)
        if "metrics" in record:
            self._evaluation(record)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close_bar()
        if self.trackers is not None:
            self.trackers.finish()
            self.trackers = None
        if self.file is not None:
            RESULTS.removeHandler(self.file)
            close_run_log(self.file)
            self.file = None


# -- the run folder --------------------------------------------------------------------------
class RunFolderHook(HookBase):
    """The run folder's results, on rank 0: ``final_metrics.json`` and, for the last evaluated
    epoch's full protocol, ``metrics.json`` and ``metrics.md``."""

    def after_train(self) -> None:
        t = self.trainer
        if not t.backend.is_main:
            return
        result = result_summary(t.history, t.epoch, t.global_step)
        (t.run_dir / "final_metrics.json").write_text(json.dumps(result, indent=2))
        if t.last_report is not None:  # the full protocol of the last evaluated epoch
            epoch, report = t.last_report
            payload = {"epoch": epoch, **report.to_dict()}
            (t.run_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
            (t.run_dir / "metrics.md").write_text(
                f"Epoch {epoch}, mean ± std over trials (%):\n\n{report.to_markdown()}\n"
            )


class RunLockHook(HookBase):
    """Releases the run folder's lock (taken when the trainer was built, before any data was
    read) when ``fit`` ends, on every way out, after every other hook has closed."""

    def close(self) -> None:  # last of all: after the logs and trackers are closed
        if getattr(self, "trainer", None) is not None:
            release_run_lock(self.trainer.run_dir)
            del self.trainer


# -- callbacks -------------------------------------------------------------------------------
EpochCallback = Callable[[Trainer, dict[str, Any]], None]


class CallbackHook(HookBase):
    """Calls ``callback(trainer, record)`` on every rank after each finished epoch (and its
    checkpoint and evaluation), and for an epoch evaluated on resume: how a sweep driver
    reports without the engine knowing about it."""

    def __init__(self, callback: EpochCallback) -> None:
        self.callback = callback

    def before_train(self) -> None:
        if self.trainer.resumed_record is not None:
            self.callback(self.trainer, self.trainer.resumed_record)

    def after_epoch(self) -> None:
        self.callback(self.trainer, self.trainer.history[-1])


def default_hooks(
    *,
    grace_s: float,
    log_every: int,
    trackers: Sequence[str],
    progress_bar: str | bool,
    run_name: str,
    config: dict[str, Any] | None,
    checkpoint_every_steps: int,
    dataset: Any,
    plan: EvaluationPlan,
    eval_every: int,
    callbacks: Sequence[EpochCallback] = (),
) -> list[HookBase]:
    """A training run's hooks, in the order they must run (see the module docstring)."""
    return [
        CheckpointHook(checkpoint_every_steps),  # before a fault or preemption at that step
        PreemptionHook(grace_s),  # installed before a resumed epoch's evaluation
        EvaluationHook(dataset, plan, eval_every),  # after the epoch's checkpoint
        LoggingHook(log_every, trackers, progress_bar, run_name, config),  # after the evaluation
        *(CallbackHook(c) for c in callbacks),
        RunFolderHook(),
    ]


__all__ = [
    "PHASES",
    "SELECTION_METRIC",
    "CallbackHook",
    "CheckpointHook",
    "EpochCallback",
    "EvaluationHook",
    "HookBase",
    "LoggingHook",
    "PhaseMarks",
    "PreemptionHook",
    "RunFolderHook",
    "RunLockHook",
    "TimerHook",
    "default_hooks",
    "result_summary",
]
