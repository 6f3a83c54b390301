"""Thin builders: validated config -> library objects (which themselves take plain arguments)."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from dist_reid.config.schema import ExperimentConfig
from dist_reid.data.datasets import VIReIDDataset, open_dataset
from dist_reid.data.synthetic.layouts import generate
from dist_reid.models.backbones import PooledBackbone

log = logging.getLogger(__name__)


def build_dataset(cfg: ExperimentConfig) -> VIReIDDataset:
    """Open ``data.root``; with ``data.synthetic.enabled`` generate it first if it is absent."""
    root = Path(cfg.data.root)
    synth = cfg.data.synthetic
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
    options = {"trial": cfg.data.trial} if cfg.data.dataset == "regdb" else {}
    return open_dataset(cfg.data.dataset, root, **options)


def build_model(cfg: ExperimentConfig) -> nn.Module:
    """The embedding model named by the config (the training engine adds method models)."""
    return PooledBackbone(cfg.model.backbone, cfg.model.pretrained)
