"""What a run reports, and where: console and ``<run>/train.log`` lines, progress bars, metric
trackers, and the cross-rank mean of what they record.

Rank 0 speaks: it logs INFO (DEBUG with ``--verbose``), writes ``train.log`` and owns the
trackers; other ranks log warnings and errors only, each prefixed with ``[rank N]``. Nothing here
knows the training loop: the loop calls these pieces from its hooks.

Heavy imports (torch, accelerate) happen inside the functions that need them, so every command
line entry can call :func:`configure_logging` at no start-up cost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_reid.config.schema import PROGRESS_BAR_SETTINGS, TRACKERS, ConfigError

if TYPE_CHECKING:
    import torch

    from dist_reid.config import ExperimentConfig, TrainConfig

__all__ = [
    "TRAIN_LOG",
    "MetricTrackers",
    "check_trackers",
    "close_run_log",
    "configure_logging",
    "epoch_line",
    "evaluation_lines",
    "format_duration",
    "launcher_rank",
    "mean_across_ranks",
    "open_run_log",
    "progress_enabled",
    "tqdm_disable",
    "tracker_names",
]

TRAIN_LOG = "train.log"
_FORMAT = "%(levelname)s %(name)s: %(message)s"  # short: batch logs are read line by line
_FILE_FORMAT = "%(asctime)s " + _FORMAT
_CONSOLE = "_dist_reid_console"  # marks the handler configure_logging owns (idempotence)


# -- logging ---------------------------------------------------------------------------------
def launcher_rank() -> int:
    """This process's global rank as the launcher set it: ``RANK`` (torchrun, accelerate,
    deepspeed) before ``SLURM_PROCID`` (srun); 0 without a launcher."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name)
        if value:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not a rank") from None
    return 0


def configure_logging(rank: int, verbose: bool = False) -> None:
    """Root logging for an entry point: rank 0 logs INFO (DEBUG when ``verbose``) to stderr;
    any other rank logs WARNING and above only, every line prefixed with ``[rank N]`` (the same
    warning from N ranks is then N distinguishable lines, and INFO is printed once per job).

    Idempotent: a second call replaces the handler the first one added (rebinding it to the
    current ``sys.stderr``) and sets the level again; other handlers are left alone.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _CONSOLE, False)]:
        root.removeHandler(handler)
        handler.close()
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _CONSOLE, True)
    prefix = f"[rank {rank}] " if rank > 0 else ""
    handler.setFormatter(logging.Formatter(prefix + _FORMAT))
    root.addHandler(handler)
    if rank > 0:
        root.setLevel(logging.WARNING)
    else:
        root.setLevel(logging.DEBUG if verbose else logging.INFO)


def open_run_log(run_dir: str | Path) -> logging.Handler:
    """Append every INFO-and-above record of this process to ``<run_dir>/train.log``, each with
    a UTC timestamp (a resumed run continues the same file). For rank 0 only: the other ranks
    log warnings only, to their console. Undo with :func:`close_run_log`; opening the same file
    twice returns the handler already attached."""
    path = (Path(run_dir) / TRAIN_LOG).resolve()
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == path:
            return handler
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    formatter = logging.Formatter(_FILE_FORMAT, datefmt="%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime  # one clock for every node of a job
    handler.setFormatter(formatter)
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    return handler


def close_run_log(handler: logging.Handler | None) -> None:
    """Detach and close a handler from :func:`open_run_log` (``None``: nothing to do)."""
    if handler is None:
        return
    logging.getLogger().removeHandler(handler)
    handler.close()


# -- progress bars ---------------------------------------------------------------------------
def progress_enabled(setting: str | bool | None) -> bool | None:
    """``train.progress_bar`` -> whether to draw progress bars: ``True``/``False`` as asked,
    ``None`` for ``auto`` (tqdm decides: drawn only when its stream is a terminal)."""
    if setting is None or isinstance(setting, bool):
        return setting
    value = str(setting).lower()
    if value not in PROGRESS_BAR_SETTINGS:
        raise ConfigError(
            f"train.progress_bar: must be one of {'|'.join(PROGRESS_BAR_SETTINGS)}, got {setting!r}"
        )
    return None if value == "auto" else value == "true"


def tqdm_disable(setting: str | bool | None, is_main: bool) -> bool | None:
    """The value for ``tqdm(disable=...)``: never a bar off rank 0; ``None`` (tqdm's own check:
    no bar unless on a terminal) for ``auto``."""
    if not is_main:
        return True
    enabled = progress_enabled(setting)
    return None if enabled is None else not enabled


# -- human lines -----------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    """``h:mm:ss``, rounded to the second (negative counts as 0)."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def epoch_line(
    *,
    epoch: int,
    epochs: int,
    steps: int,
    losses: Mapping[str, float],
    lr: float,
    images_per_s: float,
    seconds: float,
    eta_s: float | None,
) -> str:
    """One line for a finished epoch, e.g.
    ``epoch 3/81 | 120 steps | loss total 1.235 id 0.5678 | lr 1.00e-01 | 412.3 img/s |
    65.2s | ETA 1:25:13``.

    ``epoch`` is the 1-based number of the epoch just finished (epochs done). Losses print with
    4 significant digits, ``total`` first when present; ``eta_s`` None leaves the ETA out.
    """
    names = sorted(losses, key=lambda name: name != "total")  # stable: the rest keep their order
    parts = [
        f"epoch {epoch}/{epochs}",
        f"{steps} steps",
        "loss " + " ".join(f"{name} {losses[name]:.4g}" for name in names) if names else "loss -",
        f"lr {lr:.2e}",
        f"{images_per_s:.1f} img/s",
        f"{seconds:.1f}s",
    ]
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


def evaluation_lines(metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
    """A plain-text table of ``setting -> {metric: value in %}`` (``Trainer.evaluate``'s
    summary: the mean over trials per setting), 2 decimals, columns aligned, metrics in the
    protocol's order (R1 R5 R10 R20 mAP mINP) then any others; a metric a setting lacks is
    ``-``. No settings: no lines."""
    from dist_reid.evaluation.protocols import METRIC_NAMES

    if not metrics:
        return []
    present = {name for values in metrics.values() for name in values}
    columns = [m for m in METRIC_NAMES if m in present]
    for values in metrics.values():
        columns += [name for name in values if name not in columns]
    rows = [["setting", *columns]] + [
        [setting, *(f"{values[m]:.2f}" if m in values else "-" for m in columns)]
        for setting, values in metrics.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


# -- metric trackers -------------------------------------------------------------------------
_DEPRECATED_TENSORBOARD = (
    "train.tensorboard is deprecated: train.tensorboard=false means train.trackers "
    "without tensorboard (use train.trackers=[] for no trackers)"
)


def tracker_names(train: TrainConfig, warn: bool = True) -> tuple[str, ...]:
    """``train.trackers``, less ``tensorboard`` when the deprecated ``train.tensorboard`` is
    false (the config of older runs and scripts; with ``warn``, a one-line warning says so)."""
    names = tuple(train.trackers)
    if not train.tensorboard:
        if warn:
            logging.getLogger(__name__).warning(_DEPRECATED_TENSORBOARD)
        names = tuple(name for name in names if name != "tensorboard")
    return names


def _available(name: str) -> bool:
    from accelerate.utils import (
        is_aim_available,
        is_mlflow_available,
        is_tensorboard_available,
        is_wandb_available,
    )

    return {
        "tensorboard": is_tensorboard_available,
        "wandb": is_wandb_available,
        "mlflow": is_mlflow_available,
        "aim": is_aim_available,
    }[name]()


def check_trackers(names: Sequence[str]) -> None:
    """Refuse, before any training, a tracker name we do not know or one whose package is not
    installed: one :class:`ConfigError` naming ``train.trackers`` and the value. Call it on
    every rank, so all of them stop together."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(
                f"train.trackers: unknown tracker {name!r}; choose from {list(TRACKERS)}"
            )
        if not _available(name):
            raise ConfigError(
                f"train.trackers: {name!r} is not installed (pip install {name}), or drop it "
                f"from train.trackers={list(names)}"
            )


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{dotted key: bool | int | float | str | None}`` (what trackers take;
    lists and tuples as their text)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(list(value) if isinstance(value, tuple) else value)
    return out


@contextlib.contextmanager
def _accelerate_logging() -> Iterator[None]:
    """Accelerate's tracker module logs through an adapter that raises unless a PartialState
    exists, which the DeepSpeed backend never builds (building one has side effects: process
    group, threads, env): a plain logger of the same name stands in meanwhile."""
    from accelerate import tracking
    from accelerate.state import PartialState

    if getattr(PartialState, "_shared_state", None):  # the Accelerate backend's state is up
        yield
        return
    adapter = tracking.logger
    tracking.logger = logging.getLogger(tracking.__name__)
    try:
        yield
    finally:
        tracking.logger = adapter


class MetricTrackers:
    """Accelerate's tracker classes, built directly (no ``Accelerator``), so the Accelerate and
    the DeepSpeed backend log the same way. Only the process built with ``enabled=True`` (rank
    0) writes; on the others every method is a no-op.

    * tensorboard: ``<run_dir>/tensorboard`` (event files; ``dist-reid`` viz reads them there)
    * wandb: project ``$WANDB_PROJECT`` or ``dist-reid``, run ``run_name``, files under run_dir
    * mlflow: experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``dist-reid``, run ``run_name``; where it
      stores them is MLflow's own setting (``MLFLOW_TRACKING_URI``)
    * aim: repository ``run_dir``, run ``run_name``
    """

    def __init__(
        self,
        names: Sequence[str],
        run_dir: str | Path,
        *,
        run_name: str,
        enabled: bool = True,
    ) -> None:
        check_trackers(names)
        self.names = tuple(names)
        self.run_dir = Path(run_dir)
        # (name, Accelerate tracker) pairs; empty off rank 0
        self._trackers: list[tuple[str, Any]] = []
        if enabled:
            self._trackers = [(name, self._build(name, run_name)) for name in self.names]

    @classmethod
    def from_config(
        cls, cfg: ExperimentConfig, run_dir: str | Path, *, enabled: bool
    ) -> MetricTrackers:
        """From ``train.trackers`` (and the deprecated ``train.tensorboard``); ``enabled`` on
        rank 0 only. Call it on every rank: a tracker that cannot run is refused on all."""
        names = tracker_names(cfg.train, warn=enabled)  # the deprecation once, from rank 0
        return cls(names, run_dir, run_name=cfg.run.name, enabled=enabled)

    def _build(self, name: str, run_name: str) -> Any:
        from accelerate import tracking

        base = {
            "tensorboard": tracking.TensorBoardTracker,
            "wandb": tracking.WandBTracker,
            "mlflow": tracking.MLflowTracker,
            "aim": tracking.AimTracker,
        }[name]
        # We pick the writing rank ourselves; Accelerate's own main-process check would build
        # a PartialState, which the DeepSpeed backend never has.
        cls = type(base.__name__, (base,), {"main_process_only": False})
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if name == "tensorboard":
            tracker = cls("tensorboard", self.run_dir)  # writes to <run_dir>/tensorboard
        elif name == "wandb":
            project = os.environ.get("WANDB_PROJECT", "dist-reid")
            tracker = cls(project, name=run_name, dir=str(self.run_dir))
        elif name == "mlflow":
            tracker = cls(experiment_name="dist-reid", run_name=run_name)
        else:
            tracker = cls(run_name, logging_dir=str(self.run_dir))
        start = getattr(tracker, "start", None)  # newer Accelerate creates the writer lazily
        if start is not None:
            with _accelerate_logging():
                start()
        return tracker

    @property
    def active(self) -> bool:
        """Whether anything is written here (rank 0 with at least one tracker)."""
        return bool(self._trackers)

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Record scalars (e.g. ``loss/total``, ``lr``, ``eval/all/mAP``) at ``step``; reduce
        them across ranks first (:func:`mean_across_ranks`) where each rank has its own."""
        if not self._trackers:
            return
        scalars = {key: float(value) for key, value in values.items()}
        with _accelerate_logging():
            for _, tracker in self._trackers:
                tracker.log(scalars, step=step)

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The run's config as flat dotted hyper-parameters, for the trackers that keep them
        (wandb, mlflow, aim). TensorBoard is skipped: Accelerate would write its hparams into a
        new timestamped sub-run, and ``config.yaml`` beside the events already is the record."""
        flat = _flat(config)
        with _accelerate_logging():
            for name, tracker in self._trackers:
                if name != "tensorboard":
                    tracker.store_init_configuration(flat)

    def finish(self) -> None:
        """Flush and close every tracker (idempotent)."""
        trackers, self._trackers = self._trackers, []
        with _accelerate_logging():
            for _, tracker in trackers:
                tracker.finish()


# -- cross-rank reduction --------------------------------------------------------------------
def mean_across_ranks(values: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """The mean over ranks of each value, on every rank: one ``all_reduce`` of one stacked
    float64 tensor (no object gather). The identity without an initialised process group or
    with one rank.

    A collective: every rank must call it, at the same point, with the same keys (order may
    differ), or the job hangs. ``device`` must suit the process group's backend (the CUDA
    device under NCCL).
    """
    import torch
    import torch.distributed as dist

    out = {key: float(value) for key, value in values.items()}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return out
    keys = sorted(out)
    stacked = torch.tensor([out[key] for key in keys], dtype=torch.float64, device=device)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)  # AVG exists for NCCL only
    stacked /= dist.get_world_size()
    means = dict(zip(keys, stacked.tolist(), strict=True))
    return {key: means[key] for key in out}
