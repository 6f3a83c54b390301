"""Backbone initialisation: ``imagenet`` (timm pretrained tags through the Hugging Face hub cache)
or a local weights file, mapped onto our modules with a count of what was loaded.

``imagenet`` means the weights the released code loads where one is known (see
``RELEASED_IMAGENET_TAGS``), otherwise the backbone's timm default tag. Files are read from and
written to huggingface_hub's own cache (``HF_HOME`` / ``HF_HUB_CACHE``); with ``HF_HUB_OFFLINE=1``
nothing is downloaded, so compute nodes need ``dist-reid weights fetch`` run beforehand.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET = "imagenet"
MIN_LOADED_FRACTION = 0.9  # below this a file is the wrong one, not a partial fit

# Released code: AGW and PDM load torchvision's resnet50-19c8e357.pth (ImageNet-1k V1; timm's
# tv_in1k tag holds the same weights, re-serialised by torchvision as resnet50-0676ba61.pth);
# MIP (TransReID) loads jx_vit_base_p16_224-80ecf9dd.pth (ImageNet-21k, fine-tuned on 1k).
RELEASED_IMAGENET_TAGS: dict[str, str] = {
    "resnet50": "resnet50.tv_in1k",
    "vit_base_patch16_224": "vit_base_patch16_224.orig_in21k_ft_in1k",
}
_CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "head_dist.")


class PretrainedWeightsError(ValueError):
    """A ``model.pretrained`` file is missing or does not fit the backbone."""


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights are not in the local cache and may not be downloaded (offline)."""


def fetch_command(backbone: str) -> str:
    return f"dist-reid weights fetch --backbone {backbone}"


def imagenet_tag(backbone: str) -> str:
    """The timm ``arch.tag`` that ``model.pretrained: imagenet`` resolves to for ``backbone``."""
    from timm.models import get_pretrained_cfg

    if backbone in RELEASED_IMAGENET_TAGS:
        return RELEASED_IMAGENET_TAGS[backbone]
    cfg = get_pretrained_cfg(backbone)
    if cfg is None or not cfg.tag:
        raise PretrainedWeightsError(
            f"model.pretrained: imagenet: timm has no pretrained weights for backbone "
            f"{backbone!r}; use null or a local weights file"
        )
    return f"{cfg.architecture}.{cfg.tag}"


def _hub_source(tag: str) -> tuple[str, list[str]]:
    """(hub repo id, candidate file names in timm's order of preference) for a timm tag."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(tag)
    if cfg is None:
        raise PretrainedWeightsError(f"model.pretrained: unknown timm pretrained tag {tag!r}")
    if not cfg.hf_hub_id:
        raise PretrainedWeightsError(
            f"model.pretrained: timm tag {tag} has no Hugging Face hub weights; "
            "download them yourself and give model.pretrained the file"
        )
    if cfg.hf_hub_filename:
        return cfg.hf_hub_id, [cfg.hf_hub_filename]
    return cfg.hf_hub_id, ["model.safetensors", "pytorch_model.bin"]  # timm: safetensors first


def cached_weights(tag: str) -> Path | None:
    """The file of ``tag`` in the Hugging Face cache, or None when it has not been fetched."""
    from huggingface_hub import try_to_load_from_cache

    repo, names = _hub_source(tag)
    repo, _, revision = repo.partition("@")
    for name in names:
        found = try_to_load_from_cache(repo, name, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def unavailable_message(backbone: str, tag: str, reason: str = "HF_HUB_OFFLINE=1") -> str:
    from huggingface_hub import constants

    return (
        f"model.pretrained: imagenet weights {tag} for backbone {backbone} are not in the "
        f"Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}; run "
        f"'{fetch_command(backbone)}' on a machine with internet (same HF_HOME), "
        "or set model.pretrained to a local file or null"
    )


def require_imagenet_weights(backbone: str) -> str:
    """Fail fast (before any data is read) when ``backbone``'s ImageNet weights cannot be had:
    offline and not cached. Returns the tag."""
    tag = imagenet_tag(backbone)
    if cached_weights(tag) is None and _offline():
        raise WeightsUnavailableError(unavailable_message(backbone, tag))
    return tag


def fetch_weights(backbone: str) -> tuple[str, Path]:
    """Download ``backbone``'s ImageNet weights into the Hugging Face cache (a no-op when they
    are there); returns (tag, cached file)."""
    from timm.models import load_state_dict_from_hf

    tag = imagenet_tag(backbone)
    if cached_weights(tag) is None:
        if _offline():
            raise WeightsUnavailableError(
                f"cannot fetch {tag}: HF_HUB_OFFLINE is set; unset it on a machine with internet"
            )
        repo, names = _hub_source(tag)
        # timm's own loader downloads (safetensors first) exactly what training will read.
        load_state_dict_from_hf(repo, filename=names[0] if len(names) == 1 else names[1])
    path = cached_weights(tag)
    if path is None:
        raise WeightsUnavailableError(f"{tag}: download finished but no file is in the cache")
    return tag, path


def imagenet_state_dict(backbone: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(tag, state dict) of ``backbone``'s ImageNet weights from the hub cache (downloaded
    first when online and absent)."""
    tag = require_imagenet_weights(backbone)
    path = cached_weights(tag)
    if path is None:
        try:
            _, path = fetch_weights(backbone)
        except OSError as exc:  # no connection: hub errors are OSErrors
            reason = f"the download failed ({type(exc).__name__})"
            raise WeightsUnavailableError(unavailable_message(backbone, tag, reason)) from None
    log.info("model.pretrained imagenet: %s from %s", tag, path)
    return tag, read_state_dict(path)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A local weights file (``weights_only=True``; ``.safetensors`` too); nested ``state_dict``
    / ``model`` entries are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"model.pretrained: weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsError(f"model.pretrained: cannot read {path}: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"model.pretrained: {path} does not hold a state dict")
    return state


def pretrained_state(
    pretrained: str | os.PathLike[str] | None, backbone: str
) -> tuple[str, dict[str, torch.Tensor]] | None:
    """``model.pretrained`` -> (a description of the source, state dict); None = random init."""
    if pretrained is None or pretrained == "":
        return None
    if str(pretrained) == IMAGENET:
        tag, state = imagenet_state_dict(backbone)
        return f"imagenet ({tag})", state
    return str(pretrained), read_state_dict(pretrained)


@dataclass
class LoadReport:
    source: str
    total: int
    loaded: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: file (..) vs model (..)"
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.mismatched) + len(self.unexpected)

    def summary(self) -> str:
        return (
            f"model.pretrained {self.source}: {len(self.loaded)} of {self.total} backbone "
            f"tensors loaded, {self.skipped} skipped ({len(self.mismatched)} shape mismatches, "
            f"{len(self.unexpected)} unexpected), {len(self.missing)} missing"
        )


def _weights_only(keys: Iterable[str]) -> list[str]:
    # BatchNorm step counters are bookkeeping, absent from torchvision files: not counted.
    return [k for k in keys if not k.endswith("num_batches_tracked")]


def load_backbone_weights(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    *,
    handled: Iterable[str] = (),
) -> LoadReport:
    """Copy the tensors of ``state`` whose name and shape match ``module``'s into it.
    ``handled`` are keys the caller maps itself (e.g. a resized position embedding), counted as
    loaded. Logs the counts; fewer than 90 % of the module's
    tensors loaded raises ``PretrainedWeightsError`` naming the first mismatches. Classifier
    heads (``fc.``, ``head.``, ...) of the file and of the module are left out of all counts."""
    handled = set(handled)
    own = module.state_dict()
    own_keys = [k for k in _weights_only(own) if not k.startswith(_CLASSIFIER_PREFIXES)]
    report = LoadReport(source, total=len(own_keys))
    usable = {}
    for key in _weights_only(state):
        if key in handled:
            continue
        if key.startswith(_CLASSIFIER_PREFIXES):  # ImageNet classifiers: never part of ours
            continue
        if key not in own:
            report.unexpected.append(f"{key} (not in the model)")
            continue
        if tuple(own[key].shape) != tuple(state[key].shape):
            report.mismatched.append(
                f"{key} (file {tuple(state[key].shape)}, model {tuple(own[key].shape)})"
            )
            continue
        usable[key] = state[key]
    report.loaded = [*usable, *(k for k in own_keys if k in handled)]
    report.missing = [k for k in own_keys if k not in usable and k not in handled]
    if len(report.loaded) < MIN_LOADED_FRACTION * report.total:
        first = (
            report.mismatched
            + report.unexpected
            + [f"{k} (not in the file)" for k in report.missing]
        )[:5]
        raise PretrainedWeightsError(
            f"{report.summary()}: under {MIN_LOADED_FRACTION:.0%}, the file does not fit "
            f"this backbone; first mismatches: {'; '.join(first)}"
        )
    module.load_state_dict(usable, strict=False)
    log.info(report.summary())
    if report.skipped or report.missing:
        log.warning(
            "model.pretrained %s: not loaded: %s",
            source,
            "; ".join((report.mismatched + report.unexpected + report.missing)[:10]),
        )
    return report
