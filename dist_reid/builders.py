"""Thin builders: validated config -> library objects (which themselves take plain arguments)."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

from reid_kernels import BatchLayout
from torch import nn

from dist_reid.config.schema import ConfigError, ExperimentConfig
from dist_reid.data.augment import AugmentOptions
from dist_reid.data.datasets import VIReIDDataset, open_dataset
from dist_reid.data.synthetic.layouts import generate, manifest_mismatch
from dist_reid.evaluation.protocols import EvaluationPlan
from dist_reid.losses import LOSSES
from dist_reid.losses.contract import ReIDLoss
from dist_reid.models import MODELS
from dist_reid.models.contract import contract_errors
from dist_reid.models.pretrained import IMAGENET, require_imagenet_weights

log = logging.getLogger(__name__)


def ensure_synthetic(cfg: ExperimentConfig) -> None:
    """Generate the synthetic tree at ``data.root`` when asked for and absent (call on one rank)."""
    root = Path(cfg.data.root)
    synth = cfg.data.synthetic
    if synth.enabled and root.exists():
        mismatch = manifest_mismatch(
            root, cfg.data.dataset, synth.num_ids, synth.seed, synth.images_per_camera
        )
        if mismatch:  # training on another tree than the config says would be silent
            raise ValueError(
                f"{mismatch}; delete {root} (data.synthetic regenerates it) or set data.root "
                "to another folder"
            )
    if synth.enabled and not root.exists():
        log.info(
            "generating synthetic %s at %s (%d ids, seed %d)",
            cfg.data.dataset,
            root,
            synth.num_ids,
            synth.seed,
        )
        summary = generate(
            cfg.data.dataset, root, synth.num_ids, synth.seed, synth.images_per_camera
        )
        log.info("wrote %s images in %.1f s", sum(summary.images.values()), summary.seconds)


def build_dataset(cfg: ExperimentConfig, *, generate_missing: bool = True) -> VIReIDDataset:
    """Open ``data.root``; with ``data.synthetic.enabled`` generate it first if it is absent."""
    if generate_missing:
        ensure_synthetic(cfg)
    options = {"trial": cfg.data.trial} if cfg.data.dataset == "regdb" else {}
    return open_dataset(cfg.data.dataset, Path(cfg.data.root), **options)


def _call(factory, section: str, kwargs: dict):
    """Call a registered factory; an option it does not take is a config error naming the key."""
    accepted = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        for key in kwargs:
            if key not in accepted:
                raise ConfigError(
                    f"{section}.options.{key}: {factory.__name__} takes no such option "
                    f"(it takes: {', '.join(k for k in accepted if k != 'self')})"
                )
    return factory(**kwargs)


def check_options(cfg: ExperimentConfig) -> None:
    """Refuse model/loss options their factories do not take, without building anything."""
    for section, registry, options in (
        ("model", MODELS, cfg.model.options),
        ("loss", LOSSES, cfg.loss.options),
    ):
        name = getattr(cfg, section).name
        try:
            factory = registry.get(name)
        except KeyError as exc:
            raise ConfigError(f"{section}.name: {exc.args[0]}") from None
        accepted = inspect.signature(factory).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            continue
        for key in options:
            if key not in accepted:
                raise ConfigError(
                    f"{section}.options.{key}: {factory.__name__} takes no such option "
                    f"(it takes: {', '.join(k for k in accepted if k != 'self')})"
                )


def check_pretrained(cfg: ExperimentConfig, *, warn: bool = True) -> None:
    """Before any data is read: ``imagenet`` weights must be cached when offline
    (``WeightsUnavailableError``, one line naming the tag and the fetch command); random init on
    a real dataset is worth a warning."""
    if cfg.model.pretrained == IMAGENET:
        require_imagenet_weights(cfg.model.backbone)
    elif warn and cfg.model.pretrained is None and not cfg.data.synthetic.enabled:
        log.warning(
            "model.pretrained is null: the backbone starts from random weights; on %s results "
            "will be far below the papers (they start from ImageNet: model.pretrained=imagenet)",
            cfg.data.dataset,
        )


def build_model(
    cfg: ExperimentConfig, num_classes: int | None = None, *, pretrained: bool = True
) -> nn.Module:
    """The model named by ``model.name`` with its options (``num_classes`` for trained heads).
    ``pretrained=False`` skips ``model.pretrained`` (random init), for models whose weights
    come from a checkpoint next."""
    try:
        factory = MODELS.get(cfg.model.name)
    except KeyError as exc:
        raise ConfigError(f"model.name: {exc.args[0]}") from None
    kwargs = {
        "backbone": cfg.model.backbone,
        "pretrained": cfg.model.pretrained if pretrained else None,
        **cfg.model.options,
    }
    if "num_classes" in inspect.signature(factory).parameters:
        if num_classes is None:
            raise ValueError(f"model {cfg.model.name!r} needs the number of training identities")
        kwargs["num_classes"] = num_classes
    if "input_size" in inspect.signature(factory).parameters:
        # Resolution-tied parameters (PDM's positional embedding, MIP's patch grid) follow data.
        kwargs.setdefault("input_size", (cfg.data.height, cfg.data.width))
    return _call(factory, "model", kwargs)


def build_loss(cfg: ExperimentConfig, batch_layout: BatchLayout | None = None) -> nn.Module:
    """The configured loss; ``batch_layout`` (a ``reid_kernels.BatchLayout``, from the trainer's
    sampler) goes to the losses that take it, which then avoid host syncs."""
    try:
        factory = LOSSES.get(cfg.loss.name)
    except KeyError as exc:
        raise ConfigError(f"loss.name: {exc.args[0]}") from None
    kwargs = dict(cfg.loss.options)
    accepted = inspect.signature(factory).parameters
    if "kernels" in accepted:
        kwargs.setdefault("kernels", cfg.train.kernels)
    if "batch_layout" in kwargs:
        raise ConfigError(
            "loss.options.batch_layout: set by the trainer from the sampler, not a key"
        )
    if batch_layout is not None and "batch_layout" in accepted:
        kwargs["batch_layout"] = batch_layout
    return _call(factory, "loss", kwargs)


def check_method(model: nn.Module, loss: nn.Module, cfg: ExperimentConfig) -> None:
    """The method contract, checked once when model and loss are built: the model is a
    ``ReIDModel``, the loss a ``ReIDLoss``, and every output the loss reads is one the model,
    as configured, returns. One ConfigError naming the keys otherwise."""
    problems = contract_errors(model)
    if problems:
        raise ConfigError(f"model.name={cfg.model.name}: {type(model).__name__} {problems[0]}")
    if not isinstance(loss, ReIDLoss):
        raise ConfigError(
            f"loss.name={cfg.loss.name}: {type(loss).__name__} has no required_outputs"
        )
    missing = [key for key in loss.required_outputs if key not in model.output_keys]
    if missing:
        raise ConfigError(
            f"loss.name={cfg.loss.name} reads {missing} from the model, but "
            f"model.name={cfg.model.name} as configured returns only {list(model.output_keys)}"
        )


def evaluation_plan(
    cfg: ExperimentConfig, dataset: VIReIDDataset, *, every_trial: bool = False
) -> EvaluationPlan:
    """The one evaluation plan of a config and its dataset. ``eval.settings``/``eval.trials``
    when set, else every setting and the trials the dataset scores a model on (a RegDB model:
    its own trial); ``every_trial`` takes all of them (per-trial models or feature files, an
    untrained model, extracting features for later)."""
    e, d = cfg.eval, cfg.data
    trials = e.trials or (dataset.trials if every_trial else dataset.scored_trials())
    return EvaluationPlan(
        settings=tuple(e.settings or dataset.settings),
        trials=tuple(trials),
        multi_shot=e.multi_shot,
        transposed_v2i=e.llcm_transposed_v2i,
        max_rank=e.max_rank,
        height=d.height,
        width=d.width,
        mean=tuple(d.mean),
        std=tuple(d.std),
        batch_size=e.batch_size,
        flip=e.flip,
    )


def schedule_options(cfg: ExperimentConfig) -> dict:
    """``optim`` -> the keywords of :mod:`dist_reid.engine.schedules` (``schedule`` first)."""
    o = cfg.optim
    options: dict = {
        "schedule": o.schedule,
        "warmup_epochs": o.warmup_epochs,
    }
    if o.schedule == "step":
        return options | {"milestones": tuple(o.milestones), "gamma": o.gamma}
    return options | {
        "cycle_epochs": o.cycle_epochs,
        "cycle_decay": o.cycle_decay,
        "cycle_limit": o.cycle_limit,
        "min_lr_factor": o.min_lr_factor,
        "warmup_init_factor": o.warmup_init_factor,
    }


def augment_options(cfg: ExperimentConfig) -> AugmentOptions:
    a = cfg.data.augment
    return AugmentOptions(
        pad=a.pad,
        flip=a.flip,
        random_erasing=a.random_erasing,
        channel_aug=a.channel_aug,
        erasing_scale=tuple(a.erasing_area),
        erasing_fill=tuple(a.erasing_fill),
        erasing_mode=a.erasing_mode,
        grayscale=a.grayscale,
        mean=tuple(cfg.data.mean),
        std=tuple(cfg.data.std),
    )
