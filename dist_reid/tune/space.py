"""Sweep files: a base experiment config, fixed overrides and a YAML search space.

```yaml
name: icre_lambda_rho
base_config: ../sysu/icre.yaml          # relative to this file
overrides: [train.epochs=30]            # applied to every trial
search_space:                           # dotted config key -> one of:
  loss.options.lambda_icg: {grid: [0.1, 0.5, 1.0]}     #   grid (every value)
  optim.name: {choice: [sgd, adamw]}                    #   choice (sampled)
  train.lr: {loguniform: [1.0e-4, 1.0e-2]}              #   uniform / loguniform [low, high]
metric: all/mAP                         # <setting>/<R1|R5|R10|R20|mAP|mINP>, reported every epoch
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING

from dist_reid.builders import check_options
from dist_reid.config import ConfigError, ExperimentConfig, build_config, load_config

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
METRICS = ("R1", "R5", "R10", "R20", "mAP", "mINP")


@dataclass(frozen=True)
class SchedulerSpec:
    kind: str = "asha"  # asha | fifo
    grace_period: int = 10  # epochs; never shorter than the recipe's warm-up
    max_t: int = 0  # epochs; 0 = the base config's train.epochs
    reduction_factor: int = 2


@dataclass(frozen=True)
class ResourcesSpec:
    cpu: float = 1.0
    gpu: float = 0.0


@dataclass(frozen=True)
class SweepSpec:
    base_config: str = MISSING
    name: str = "sweep"
    overrides: tuple[str, ...] = ()
    search_space: dict[str, Any] = field(default_factory=dict)
    metric: str = "all/mAP"
    mode: str = "max"
    num_samples: int = 1
    search_alg: str = "none"  # none | optuna | hyperopt (when installed)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    max_failures: int = 1  # retries of a crashed trial
    storage: str = "runs/tune"
    heatmap: tuple[str, ...] = ()  # two keys for the heatmap axes; default: the first two grid keys

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ConfigError(f"mode: must be 'max' or 'min', got {self.mode!r}")
        if self.search_alg not in ("none", "optuna", "hyperopt"):
            raise ConfigError(f"search_alg: must be none|optuna|hyperopt, got {self.search_alg!r}")
        if self.scheduler.kind not in ("asha", "fifo"):
            raise ConfigError(f"scheduler.kind: must be asha|fifo, got {self.scheduler.kind!r}")
        # (scheduler.grace_period is checked against the recipe's warm-up by validate_sweep)
        for key, value, low in (
            ("num_samples", self.num_samples, 1),
            ("max_failures", self.max_failures, -1),  # -1: Ray's "retry without limit"
            ("scheduler.max_t", self.scheduler.max_t, 0),
            ("scheduler.reduction_factor", self.scheduler.reduction_factor, 2),
            ("resources.gpu", self.resources.gpu, 0),
        ):
            if value < low:
                raise ConfigError(f"{key}: must be >= {low}, got {value}")
        if self.resources.cpu <= 0:
            raise ConfigError(f"resources.cpu: must be > 0, got {self.resources.cpu}")
        if not self.search_space:
            raise ConfigError("search_space: empty; name at least one dotted config key")
        setting, _, metric = self.metric.partition("/")
        if not setting or metric not in METRICS:
            raise ConfigError(
                f"metric: expected '<setting>/<{'|'.join(METRICS)}>', got {self.metric!r}"
            )
        for key, dist in self.search_space.items():
            if isinstance(dist, dict):
                if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                    raise ConfigError(
                        f"search_space.{key}: expected one of {DISTRIBUTIONS}, got {dict(dist)}"
                    )
                kind, values = next(iter(dist.items()))
                if not isinstance(values, (list, tuple)) or not values:
                    raise ConfigError(f"search_space.{key}.{kind}: expected a non-empty list")
                if kind in ("uniform", "loguniform") and len(values) != 2:
                    raise ConfigError(f"search_space.{key}.{kind}: expected [low, high]")

    @property
    def setting(self) -> str:
        return self.metric.partition("/")[0]

    @property
    def metric_name(self) -> str:
        return self.metric.partition("/")[2]

    def grid_keys(self) -> list[str]:
        return [k for k, d in self.search_space.items() if isinstance(d, dict) and "grid" in d]


def format_override(key: str, value: Any) -> str:
    """``key=value`` as a dotted override (lists/bools/None in YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return f"{key}={text.removesuffix('...').strip()}"


def load_sweep(path: str | os.PathLike[str], overrides: tuple[str, ...] = ()) -> SweepSpec:
    """Read a sweep file; ``base_config`` is resolved relative to it.

    ``overrides`` whose first key is a sweep field (``num_samples=4``) change the sweep; the
    others (``data.root=/data/SYSU-MM01``) are appended to the experiment overrides of every trial.
    """
    fields = set(SweepSpec.__dataclass_fields__)
    own = tuple(o for o in overrides if o.partition("=")[0].split(".")[0] in fields)
    passed = tuple(o for o in overrides if o not in own)
    spec = build_config(SweepSpec, path, own)
    if passed:
        spec = SweepSpec(**{**spec.__dict__, "overrides": (*spec.overrides, *passed)})
    base = Path(spec.base_config)
    if not base.is_absolute():
        base = (Path(path).parent / base).resolve()
    return SweepSpec(**{**spec.__dict__, "base_config": str(base)})


def representative(dist: Any) -> Any:
    """One value of a distribution, used to type-check its key before any trial starts."""
    if not isinstance(dist, dict):
        return dist
    kind, values = next(iter(dist.items()))
    return values[0] if kind in ("grid", "choice") else float(values[0])


def trial_config(
    spec: SweepSpec, params: dict[str, Any], extra: tuple[str, ...] = ()
) -> ExperimentConfig:
    overrides = [*spec.overrides, *(format_override(k, v) for k, v in params.items()), *extra]
    return load_config(spec.base_config, overrides)


def validate_sweep(spec: SweepSpec) -> ExperimentConfig:
    """Every key of the search space must be a real config path (or a real option of the chosen
    model/loss) with a value of the right type: one clear error before any trial starts.
    Returns the base config with representative values."""
    cfg = load_config(spec.base_config, spec.overrides)
    for key, dist in spec.search_space.items():
        try:
            trial_cfg = load_config(
                spec.base_config, [*spec.overrides, format_override(key, representative(dist))]
            )
            check_options(trial_cfg)
        except ConfigError as exc:
            raise ConfigError(f"search_space.{key}: {exc}") from None
    if spec.scheduler.kind == "asha" and spec.scheduler.grace_period < cfg.optim.warmup_epochs:
        raise ConfigError(
            f"scheduler.grace_period: {spec.scheduler.grace_period} epochs is shorter than the recipe's "
            f"warm-up ({cfg.optim.warmup_epochs} epochs); ASHA would rank warm-up noise"
        )
    settings = cfg.eval.settings or ()
    if settings and spec.setting not in settings:
        raise ConfigError(
            f"metric: setting {spec.setting!r} is not evaluated (eval.settings = {list(settings)})"
        )
    return cfg
