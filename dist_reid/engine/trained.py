"""A trained model from its checkpoint: the config stored in it, the weights, one readable error
when they do not fit. ``eval``, ``extract``, ``plot`` and ``export`` all go through here.

Every checkpoint the trainer writes (``last.pt`` and ``best.pt``) holds its resolved config and
class count, so ``--checkpoint`` alone is enough. A ``-c CONFIG`` given as well contributes only
the evaluation side (:data:`EVALUATION_KEYS`: which dataset, where it lies, how it is scored);
the model side (architecture, input size, normalisation) stays the checkpoint's. Dotted
overrides apply last: what the user typed wins.

A tool reads its checkpoint once (:func:`read_trained_state`) and hands the contents to both
:func:`checkpoint_config` and :func:`load_trained_model` (``state=``): a checkpoint of a large
model is hundreds of megabytes.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from dist_reid.builders import build_dataset, build_model
from dist_reid.config import ConfigError, ExperimentConfig, build_config, load_config, plain_config
from dist_reid.engine.checkpoint import read_model_file
from dist_reid.models.backbones import state_dict_mismatch

# What a -c CONFIG may change of a trained run's config: the data to score and how.
EVALUATION_KEYS = (
    "data.dataset",
    "data.root",
    "data.num_workers",
    "data.synthetic",
    "eval",
    "run.output_dir",
    "run.name",
)


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = copy.deepcopy(value)


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def read_trained_state(checkpoint: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The contents of ``checkpoint`` (read safely, :func:`read_model_file`), or ``None`` for no
    checkpoint or a per-trial ``{trial}`` pattern (each trial's file is read when scored)."""
    if checkpoint is None or "{trial}" in str(checkpoint):
        return None
    return read_model_file(checkpoint)


def checkpoint_config(
    checkpoint: str | os.PathLike[str] | None,
    config: str | os.PathLike[str] | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    *,
    state: Mapping[str, Any] | None = None,
) -> ExperimentConfig:
    """The config a tool runs a checkpoint with (module docstring). Without a stored config
    (a plain state dict, a per-trial ``{trial}`` pattern, no checkpoint) ``-c`` is required.
    ``state``: the checkpoint's contents when the caller has read them already (not re-read)."""
    if state is None:
        state = read_trained_state(checkpoint)
    stored = state.get("config") if state is not None else None
    if stored is None:
        if config is None:
            what = f"checkpoint {checkpoint} holds no config" if checkpoint else "no checkpoint"
            raise ConfigError(f"{what}: give -c CONFIG (the config it was trained with)")
        return load_config(config, overrides)
    values = copy.deepcopy(stored)
    if config is not None:
        given = plain_config(load_config(config))
        for key in EVALUATION_KEYS:
            _set(values, key, _get(given, key))
    return build_config(
        ExperimentConfig, overrides=overrides, values=values, source=f"checkpoint {checkpoint}"
    )


def load_trained_model(
    checkpoint: str | os.PathLike[str],
    cfg: ExperimentConfig,
    num_classes: int | None = None,
    *,
    state: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The model ``cfg`` describes with the checkpoint's weights (``weights_only``), in eval
    mode. The class count comes from the checkpoint, else ``num_classes``, else the dataset's
    training identities. A file that does not fit is one ValueError naming the first missing,
    unexpected and differently shaped keys. ``state``: the contents of ``checkpoint`` when the
    caller has read them already (:func:`read_trained_state`); the file is then not re-read and
    ``checkpoint`` only names it in errors."""
    if state is None:
        state = read_model_file(checkpoint)
    weights = state["model"] if isinstance(state.get("model"), dict) else state
    classes = state.get("num_classes") or num_classes or build_dataset(cfg).num_train_ids
    model = build_model(cfg, int(classes), pretrained=False)
    problem = state_dict_mismatch(model.state_dict(), weights)
    if problem:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit model.name={cfg.model.name} "
            f"({cfg.model.backbone}): {problem}"
        )
    model.load_state_dict(weights)
    return model.eval()


def evaluation_dir(
    checkpoint: str | os.PathLike[str] | None, cfg: ExperimentConfig, name: str | None = None
) -> Path:
    """Where an evaluation writes: ``<run>/eval/<name or UTC time>/``, ``<run>`` being the
    checkpoint's run folder (the folder holding it and its ``config.yaml``), else
    ``run.output_dir/run.name``; a training run's own files are never rewritten."""
    folder = Path(checkpoint).parent if checkpoint is not None else None
    if (
        folder is not None
        and "{trial}" not in str(checkpoint)
        and (folder / "config.yaml").is_file()
    ):
        run = folder
    else:
        run = Path(cfg.run.output_dir) / cfg.run.name
    return run / "eval" / (name or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))


__all__ = [
    "EVALUATION_KEYS",
    "checkpoint_config",
    "evaluation_dir",
    "load_trained_model",
    "read_trained_state",
]
