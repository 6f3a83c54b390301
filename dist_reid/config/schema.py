"""Typed config schemas (OmegaConf structured configs).

Every field is a plain value so the library below stays usable without a config object; the
builders map these onto keyword arguments. Value checks live in ``__post_init__`` and raise
:class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and/or dotted key."""


DATASETS = ("sysu", "regdb", "llcm")
# Metric trackers a run can write to (Accelerate's tracker classes; each needs its package).
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim")
PROGRESS_BAR_SETTINGS = ("auto", "true", "false")
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
class AugmentConfig:
    """Training augmentation (protocols.md section 6); AGW's recipe is pad + crop + flip."""

    pad: int = 10
    flip: bool = True
    random_erasing: float = 0.0
    channel_aug: bool = False
    # erased box: area fraction range, fill written into the normalised tensor (per channel)
    erasing_area: tuple[float, ...] = (0.02, 0.4)
    erasing_fill: tuple[float, ...] = (0.0, 0.0, 0.0)
    # torchvision (aspect log-uniform in [0.3, 3.3], 10 tries) | released (uniform in [0.3, 1/0.3],
    # 100 tries: the RandomErasing class of the AGW/PDM repositories)
    erasing_mode: str = "torchvision"
    grayscale: float = 0.0  # probability of PIL-luma gray (3 equal channels) before normalising

    def __post_init__(self) -> None:
        _require(self.pad >= 0, "data.augment.pad", f"must be >= 0, got {self.pad}")
        _require(
            0 <= self.random_erasing <= 1, "data.augment.random_erasing", "must be a probability"
        )
        _require(
            len(self.erasing_area) == 2 and 0 < self.erasing_area[0] <= self.erasing_area[-1] < 1,
            "data.augment.erasing_area",
            f"must be [low, high] with 0 < low <= high < 1, got {list(self.erasing_area)}",
        )
        _require(
            len(self.erasing_fill) == 3,
            "data.augment.erasing_fill",
            f"must be 3 values (one per channel), got {list(self.erasing_fill)}",
        )
        _require(0 <= self.grayscale <= 1, "data.augment.grayscale", "must be a probability")
        _require(
            self.erasing_mode in ("torchvision", "released"),
            "data.augment.erasing_mode",
            f"must be torchvision|released, got {self.erasing_mode!r}",
        )


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "sysu"
    root: str = MISSING
    height: int = 288
    width: int = 144
    num_workers: int = 2
    trial: int = 1  # RegDB: which of the 10 splits (1..10) trains and evaluates a model
    pipeline: str = "torch"  # torch | dali | auto (DALI when on a GPU and installed, else torch)
    dali_cache: bool = False  # DALI: decode + resize each image once, augment every step
    skip_corrupt: bool = False  # replace an unreadable image (same id + modality) with a warning
    # normalisation of train and test images (ImageNet statistics; MIP's ViT uses 0.5, 0.5)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    sampler: str = "modality_balanced"  # modality_balanced (AGW/PDM) | identity_modality (MIP)
    # modality_balanced: always = the released IdentitySampler; when_short = only if < K images
    sampler_replacement: str = "when_short"
    # identity_modality: drop = released SYSU branch (n % K dropped); pad = released RegDB branch
    sampler_remainder: str = "drop"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        _require(
            self.dataset in DATASETS,
            "data.dataset",
            f"must be one of {DATASETS}, got {self.dataset!r}",
        )
        _require(self.height > 0, "data.height", f"must be > 0, got {self.height}")
        _require(self.width > 0, "data.width", f"must be > 0, got {self.width}")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _require(1 <= self.trial <= 10, "data.trial", f"must be in 1..10, got {self.trial}")
        _require(
            self.pipeline in ("auto", "torch", "dali"),
            "data.pipeline",
            f"must be auto|torch|dali, got {self.pipeline!r}",
        )
        for key, values in (("data.mean", self.mean), ("data.std", self.std)):
            _require(len(values) == 3, key, f"must be 3 values (R, G, B), got {list(values)}")
        _require(
            all(s > 0 for s in self.std), "data.std", f"must be positive, got {list(self.std)}"
        )
        _require(
            self.sampler in ("modality_balanced", "identity_modality"),
            "data.sampler",
            f"must be modality_balanced|identity_modality, got {self.sampler!r}",
        )
        _require(
            self.sampler_replacement in ("always", "when_short"),
            "data.sampler_replacement",
            f"must be always|when_short, got {self.sampler_replacement!r}",
        )
        _require(
            self.sampler_remainder in ("drop", "pad"),
            "data.sampler_remainder",
            f"must be drop|pad, got {self.sampler_remainder!r}",
        )


@dataclass(frozen=True)
class ModelConfig:
    name: str = "backbone"  # a registered model: "backbone" (evaluation only), "agw", ...
    backbone: str = "resnet50"
    # "imagenet" = the weights the released code loads (timm tag via the Hugging Face cache),
    # a local weights file (weights_only), or None = random init.
    pretrained: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the method's own keyword arguments

    def __post_init__(self) -> None:
        _require(bool(self.backbone), "model.backbone", "must name a backbone")
        _require(
            self.pretrained is None or (isinstance(self.pretrained, str) and self.pretrained != ""),
            "model.pretrained",
            f"must be imagenet, a weights file or null, got {self.pretrained!r}",
        )


@dataclass(frozen=True)
class LossConfig:
    name: str = "agw"  # a registered loss
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    lr_mults: dict[str, float] = field(
        default_factory=dict
    )  # per model lr group, e.g. {backbone: 0.1}
    grad_clip: float | None = None
    warmup_epochs: int = 10  # linear warm-up lr*(e+1)/warmup
    milestones: tuple[int, ...] = (20, 50)
    gamma: float = 0.1
    impl: str = "auto"  # auto | torch | apex (FusedAdam/FusedSGD when apex is importable)
    # step (warm-up + milestones, AGW) | cosine_refine (MIP's released cosine with restarts);
    # the cycle_* / *_factor keys are cosine_refine's (released factory values by default).
    schedule: str = "step"
    cycle_epochs: int = 30  # restart period (released COSINE_EPOCHS)
    cycle_decay: float = 0.1  # each restart's peak and floor x this
    cycle_limit: int = 10  # after this many cycles the lr stays at the floor; 0 = never
    min_lr_factor: float = 0.002  # floor = this * train.lr (released MIN_INDEX)
    warmup_init_factor: float = 0.01  # warm-up starts at this * train.lr

    def __post_init__(self) -> None:
        _require(
            self.impl in ("auto", "torch", "apex"),
            "optim.impl",
            f"must be auto|torch|apex, got {self.impl!r}",
        )
        _require(
            self.name in ("sgd", "adamw"),
            "optim.name",
            f"must be 'sgd' or 'adamw', got {self.name!r}",
        )
        _require(self.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
        _require(
            list(self.milestones) == sorted(self.milestones),
            "optim.milestones",
            "must be ascending",
        )
        _require(
            all(m >= 0 for m in self.milestones),
            "optim.milestones",
            f"must be epochs >= 0, got {list(self.milestones)}",
        )
        _require(
            self.schedule in ("step", "cosine_refine"),
            "optim.schedule",
            f"must be step|cosine_refine, got {self.schedule!r}",
        )
        _require(self.cycle_epochs >= 1, "optim.cycle_epochs", "must be >= 1")
        _require(self.cycle_limit >= 0, "optim.cycle_limit", "must be >= 0 (0 = no limit)")
        _require(self.min_lr_factor >= 0, "optim.min_lr_factor", "must be >= 0")
        _require(self.warmup_init_factor >= 0, "optim.warmup_init_factor", "must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe; consumed by the training engine."""

    epochs: int = 81
    lr: float = 0.1
    weight_decay: float = 5e-4
    ids_per_batch: int = 8  # P, global over all ranks
    instances_per_modality: int = 4  # K
    backend: str = "accelerate"
    # auto | no | bf16 | fp16. auto: the launcher decides (`accelerate launch --mixed_precision`,
    # or the DeepSpeed JSON with backend deepspeed), fp32 without a launcher setting; an
    # explicit value wins over the launcher (the engine logs which source decided).
    mixed_precision: str = "auto"
    grad_accum: int = 1
    channels_last: bool = False
    compile: bool = False
    kernels: str = "auto"  # reid_kernels backend: auto | triton | torch
    eval_every: int = 10  # epochs; the last epoch is always evaluated
    log_every: int = 10  # steps
    max_steps: int = 0  # stop (and checkpoint) after this many optimiser steps; 0 = no cap
    checkpoint_every_steps: int = 0  # extra mid-epoch checkpoints; 0 = at epoch ends only
    # where metrics go: any of TRACKERS; [] = none. tensorboard writes <run>/tensorboard
    trackers: tuple[str, ...] = ("tensorboard",)
    tensorboard: bool = True  # deprecated: false = train.trackers without tensorboard
    # auto = only when stderr is a terminal (none in a batch job's log); true | false
    progress_bar: str = "auto"
    deepspeed_config: str | None = None  # DeepSpeed JSON (configs/deepspeed/) for backend deepspeed
    sync_bn: bool = False  # BatchNorm -> SyncBatchNorm (CUDA only)
    # A hung peer blocks every other rank inside a collective until this timeout (torch's own
    # default is 30 min); set-up gets a longer one: nodes start at different times and rank 0
    # may build the dataset first while the others wait.
    dist_timeout_s: float = 300.0
    dist_init_timeout_s: float = 1200.0  # set-up: group, dataset, first step, resume
    # After SIGUSR1/SIGTERM: exit (non-zero, no checkpoint) if the step-boundary checkpoint is
    # not written within this many seconds (a peer hung in a collective), rather than hang.
    preempt_grace_s: float = 60.0

    def __post_init__(self) -> None:
        _require(self.epochs >= 0, "train.epochs", f"must be >= 0, got {self.epochs}")
        _require(
            1 <= self.dist_timeout_s <= 86400,
            "train.dist_timeout_s",
            f"must be in [1, 86400] seconds, got {self.dist_timeout_s}",
        )
        _require(
            self.dist_timeout_s <= self.dist_init_timeout_s <= 86400,
            "train.dist_init_timeout_s",
            f"must be in [train.dist_timeout_s={self.dist_timeout_s}, 86400] seconds, "
            f"got {self.dist_init_timeout_s}",
        )
        _require(
            1 <= self.preempt_grace_s <= 3600,
            "train.preempt_grace_s",
            f"must be in [1, 3600] seconds, got {self.preempt_grace_s}",
        )
        _require(
            self.backend in ("accelerate", "deepspeed"),
            "train.backend",
            f"must be 'accelerate' or 'deepspeed', got {self.backend!r}",
        )
        _require(
            self.backend != "deepspeed" or bool(self.deepspeed_config),
            "train.deepspeed_config",
            "must name a DeepSpeed JSON (e.g. configs/deepspeed/zero2_bf16.json) with backend deepspeed",
        )
        if self.mixed_precision in ("False", "false"):  # YAML reads a bare `no` as a boolean
            object.__setattr__(self, "mixed_precision", "no")
        _require(
            self.mixed_precision in ("auto", "no", "bf16", "fp16"),
            "train.mixed_precision",
            f"must be auto|no|bf16|fp16, got {self.mixed_precision!r}",
        )
        _require(
            self.kernels in ("auto", "triton", "torch"),
            "train.kernels",
            f"must be auto|triton|torch, got {self.kernels!r}",
        )
        _require(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        unknown = [name for name in self.trackers if name not in TRACKERS]
        _require(
            not unknown,
            "train.trackers",
            f"unknown tracker {unknown[0]!r} in {list(self.trackers)}; choose from {list(TRACKERS)}"
            if unknown
            else "",
        )
        _require(
            len(set(self.trackers)) == len(self.trackers),
            "train.trackers",
            f"names a tracker twice: {list(self.trackers)}",
        )
        # YAML reads a bare true/false as a boolean, which the str field holds as 'True'/'False'
        object.__setattr__(self, "progress_bar", str(self.progress_bar).lower())
        _require(
            self.progress_bar in PROGRESS_BAR_SETTINGS,
            "train.progress_bar",
            f"must be auto|true|false, got {self.progress_bar!r}",
        )
        _require(self.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = the last epoch only)")
        _require(self.max_steps >= 0, "train.max_steps", "must be >= 0 (0 = no cap)")
        # log_every divides the step count: 0 would fail at the first step, not here
        _require(self.log_every >= 1, "train.log_every", f"must be >= 1, got {self.log_every}")
        _require(
            self.checkpoint_every_steps >= 0,
            "train.checkpoint_every_steps",
            "must be >= 0 (0 = at epoch ends only)",
        )
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(self.ids_per_batch >= 1, "train.ids_per_batch", "must be >= 1")
        _require(self.instances_per_modality >= 1, "train.instances_per_modality", "must be >= 1")


@dataclass(frozen=True)
class EvalConfig:
    settings: tuple[str, ...] = ()  # empty = every setting of the dataset's protocol
    trials: tuple[int, ...] = ()  # empty = the protocol's ten trials
    max_rank: int = 20
    batch_size: int = 64
    flip: bool = False  # average each test embedding with its mirror's (CAJ/DEEN/PDM test-time aug)
    multi_shot: bool = False  # SYSU-MM01/LLCM: 10 gallery images per (id, camera) instead of 1
    llcm_transposed_v2i: bool = False  # DEEN's transposed VIS->IR variant (protocols.md 3.2)
    chance_draws: int = 5  # random-feature rankings averaged for the chance column
    rerank: bool = False  # also report k-reciprocal re-ranked numbers (separately, labelled)
    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3
    query_expansion: int = 0  # k of average query expansion for the re-ranked report; 0 = off

    def __post_init__(self) -> None:
        _require(self.max_rank >= 1, "eval.max_rank", f"must be >= 1, got {self.max_rank}")
        _require(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.chance_draws >= 0, "eval.chance_draws", "must be >= 0")
        _require(self.rerank_k1 >= 1, "eval.rerank_k1", f"must be >= 1, got {self.rerank_k1}")
        _require(self.rerank_k2 >= 1, "eval.rerank_k2", f"must be >= 1, got {self.rerank_k2}")
        _require(self.query_expansion >= 0, "eval.query_expansion", "must be >= 0 (0 = off)")
        _require(
            all(t >= 0 for t in self.trials),
            "eval.trials",
            f"must be trial indices >= 0, got {list(self.trials)}",
        )


@dataclass(frozen=True)
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
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
