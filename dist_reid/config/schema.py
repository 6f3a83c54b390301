"""Typed config schemas (OmegaConf structured configs).

Every field is a plain value so the library below stays usable without a config object; the
builders map these onto keyword arguments. Value checks live in ``__post_init__`` and raise
:class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and/or dotted key."""


DATASETS = ("sysu", "regdb", "llcm")
# The settings each dataset's protocol can run, in the order the table prints them.
DATASET_SETTINGS = {
    "sysu": ("all", "indoor"),
    "regdb": ("v2t", "t2v"),
    "llcm": ("i2v", "v2i"),
}


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    output_dir: str = "runs"  # the run writes to <output_dir>/<name>/
    seed: int = 0


@dataclass(frozen=True)
class SyntheticConfig:
    """Generate a synthetic tree at ``data.root`` when it does not exist yet."""

    enabled: bool = False
    num_ids: int = 60
    seed: int = 0
    images_per_camera: int = 6

    def __post_init__(self) -> None:
        _require(self.num_ids >= 4, "data.synthetic.num_ids", f"must be >= 4, got {self.num_ids}")
        _require(
            self.images_per_camera >= 1,
            "data.synthetic.images_per_camera",
            f"must be >= 1, got {self.images_per_camera}",
        )


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "sysu"
    root: str = MISSING
    height: int = 288
    width: int = 144
    num_workers: int = 2
    trial: int = 1  # RegDB: which of the 10 splits (1..10) trains and evaluates a model
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        _require(
            self.dataset in DATASETS,
            "data.dataset",
            f"must be one of {DATASETS}, got {self.dataset!r}",
        )
        _require(self.height > 0 and self.width > 0, "data.height/data.width", "must be positive")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _require(1 <= self.trial <= 10, "data.trial", f"must be in 1..10, got {self.trial}")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"
    pretrained: str | None = None  # a local weights file; None = random init (never a hub download)

    def __post_init__(self) -> None:
        _require(bool(self.backbone), "model.backbone", "must name a backbone")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe; consumed by the training engine."""

    epochs: int = 81
    lr: float = 0.1
    weight_decay: float = 5e-4
    ids_per_batch: int = 8
    instances_per_modality: int = 4

    def __post_init__(self) -> None:
        _require(self.epochs >= 0, "train.epochs", f"must be >= 0, got {self.epochs}")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(self.ids_per_batch >= 1, "train.ids_per_batch", "must be >= 1")
        _require(self.instances_per_modality >= 1, "train.instances_per_modality", "must be >= 1")


@dataclass(frozen=True)
class EvalConfig:
    settings: tuple[str, ...] = ()  # empty = every setting of the dataset's protocol
    trials: tuple[int, ...] = ()  # empty = the protocol's ten trials
    max_rank: int = 20
    batch_size: int = 64
    multi_shot: bool = False  # SYSU-MM01/LLCM: 10 gallery images per (id, camera) instead of 1
    llcm_transposed_v2i: bool = False  # DEEN's transposed VIS->IR variant (protocols.md 3.2)
    chance_draws: int = 5  # random-feature rankings averaged for the chance column

    def __post_init__(self) -> None:
        _require(self.max_rank >= 1, "eval.max_rank", f"must be >= 1, got {self.max_rank}")
        _require(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.chance_draws >= 0, "eval.chance_draws", "must be >= 0")


@dataclass(frozen=True)
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        allowed = DATASET_SETTINGS[self.data.dataset]
        for setting in self.eval.settings:
            _require(
                setting in allowed,
                "eval.settings",
                f"{setting!r} is not a setting of {self.data.dataset!r}; choose from {allowed}",
            )
