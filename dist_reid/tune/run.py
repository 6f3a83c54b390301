"""Run, restore and summarise a sweep: table (CSV + markdown), best config YAML, heatmap."""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dist_reid.builders import check_pretrained, ensure_synthetic
from dist_reid.config import to_yaml
from dist_reid.tune.space import METRICS, SweepSpec, trial_config, validate_sweep
from dist_reid.tune.trainable import run_trial

log = logging.getLogger(__name__)


@dataclass
class SweepOutputs:
    table_csv: Path
    table_md: Path
    best_config: Path | None
    heatmap: Path | None
    rows: list[dict[str, Any]]


def _param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for key, dist in spec.search_space.items():
        if not isinstance(dist, dict):
            space[key] = dist
            continue
        kind, values = next(iter(dist.items()))
        space[key] = {
            "grid": lambda v: tune.grid_search(list(v)),
            "choice": lambda v: tune.choice(list(v)),
            "uniform": lambda v: tune.uniform(float(v[0]), float(v[1])),
            "loguniform": lambda v: tune.loguniform(float(v[0]), float(v[1])),
        }[kind](values)
    return space


def _search_alg(spec: SweepSpec):
    if spec.search_alg == "none":
        return None
    if spec.grid_keys():
        raise ValueError(
            f"search_alg {spec.search_alg!r} cannot sample grid keys {spec.grid_keys()}; use choice"
        )
    try:
        if spec.search_alg == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch()
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch()
    except (ImportError, AssertionError) as exc:
        raise ValueError(f"search_alg {spec.search_alg!r} is not installed: {exc}") from None


def _scheduler(spec: SweepSpec, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        max_t=spec.scheduler.max_t or epochs,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


def _trainable(spec: SweepSpec):
    from ray import tune

    trainable = tune.with_parameters(run_trial, spec=spec)
    return tune.with_resources(trainable, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def run_sweep(
    spec: SweepSpec, *, resume: bool = False, num_cpus: int | None = None
) -> SweepOutputs:
    """Validate the space (one clear error before any trial), run or restore it, summarise it."""
    import ray
    from ray import tune

    cfg = validate_sweep(spec)
    check_pretrained(cfg, warn=False)  # offline without ImageNet weights: stop before any trial
    ensure_synthetic(cfg)  # once, here: trials generating it concurrently would race
    # Trials run in Ray workers: pin the data root to an absolute path.
    spec = replace(spec, overrides=(*spec.overrides, f"data.root={Path(cfg.data.root).resolve()}"))
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    storage = Path(spec.storage).resolve()
    experiment = storage / spec.name
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    if resume:
        if not tune.Tuner.can_restore(str(experiment)):
            raise FileNotFoundError(f"no sweep to resume at {experiment}")
        tuner = tune.Tuner.restore(str(experiment), trainable=_trainable(spec), resume_errored=True)
    else:
        tuner = tune.Tuner(
            _trainable(spec),
            param_space=_param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                num_samples=spec.num_samples,
                search_alg=_search_alg(spec),
                scheduler=_scheduler(spec, cfg.train.epochs),
            ),
            run_config=tune.RunConfig(
                name=spec.name,
                storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=1,
            ),
        )
    grid = tuner.fit()
    return summarise(spec, grid, experiment)


def _row(spec: SweepSpec, result) -> dict[str, Any]:
    trial_id = (result.metrics or {}).get("trial_id")
    row: dict[str, Any] = {"trial": trial_id or (Path(result.path).name if result.path else "?")}
    row.update({key: (result.config or {}).get(key) for key in spec.search_space})
    frame = result.metrics_dataframe
    column = spec.metric
    if frame is not None and column in frame and frame[column].notna().any():
        best = frame.loc[frame[column].idxmax() if spec.mode == "max" else frame[column].idxmin()]
        row["best_epoch"] = int(best["epoch"])
        row["epochs_run"] = int(frame["epoch"].max())
        for metric in ("R1", "mAP", "mINP"):
            row[metric] = float(best[f"{spec.setting}/{metric}"])
    else:
        row.update({"best_epoch": None, "epochs_run": 0, "R1": None, "mAP": None, "mINP": None})
    row["error"] = _error_line(result.error)
    return row


def _error_line(error: BaseException | None) -> str:
    """The exception's own message (Ray wraps it in a multi-line remote traceback)."""
    if error is None:
        return ""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    return (lines[-1] if lines else type(error).__name__)[:300]


def _markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)\n"
    keys = list(rows[0])

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def summarise(spec: SweepSpec, grid, experiment: Path) -> SweepOutputs:
    """Write results.csv / results.md, best_config.yaml and heatmap.png into the sweep folder."""
    import csv

    rows = [_row(spec, result) for result in grid]
    experiment.mkdir(parents=True, exist_ok=True)
    table_csv, table_md = experiment / "results.csv", experiment / "results.md"
    with open(table_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    table_md.write_text(
        f"Sweep {spec.name}: {spec.metric} ({spec.mode}) at each trial's best epoch\n\n"
        + _markdown(rows)
    )
    scored = [r for r in rows if r.get(spec.metric_name) is not None]
    best_config = None
    if scored:
        pick = max if spec.mode == "max" else min
        best = pick(scored, key=lambda r: r[spec.metric_name])
        params = {k: best[k] for k in spec.search_space}
        cfg = trial_config(spec, params)
        best_config = experiment / "best_config.yaml"
        header = f"# best trial {best['trial']} of sweep {spec.name}: {spec.metric} = {best[spec.metric_name]:.4f} at epoch {best['best_epoch']}\n"
        best_config.write_text(header + to_yaml(cfg))
    heatmap = _heatmap(spec, rows, experiment / "heatmap.png")
    return SweepOutputs(table_csv, table_md, best_config, heatmap, rows)


def _heatmap(spec: SweepSpec, rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Mean best-epoch metric over two swept keys (the ICRE sensitivity figure)."""
    keys = list(spec.heatmap) or spec.grid_keys()[:2]
    if len(keys) != 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def order(value: Any) -> tuple:
        return (0, float(value), "") if isinstance(value, (int, float)) else (1, 0.0, str(value))

    xs = sorted({r[keys[0]] for r in rows}, key=order)
    ys = sorted({r[keys[1]] for r in rows}, key=order)
    grid = np.full((len(ys), len(xs)), np.nan)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            values = [
                r[spec.metric_name]
                for r in rows
                if r[keys[0]] == x and r[keys[1]] == y and r[spec.metric_name] is not None
            ]
            if values:
                grid[i, j] = float(np.mean(values))
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2.5, 0.9 * len(ys) + 2))
    image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(ys)), [str(y) for y in ys])
    ax.set_xlabel(keys[0])
    ax.set_ylabel(keys[1])
    for i in range(len(ys)):
        for j in range(len(xs)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="w")
    fig.colorbar(image, ax=ax, label=f"{spec.metric} (%)")
    ax.set_title(f"{spec.name}: {spec.metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["METRICS", "SweepOutputs", "run_sweep", "summarise"]
