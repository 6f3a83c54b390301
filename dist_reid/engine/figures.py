"""The figures job: a trained model's features on one protocol trial -> viz plots."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_reid.builders import build_dataset, build_model, evaluation_plan
from dist_reid.config import ExperimentConfig
from dist_reid.data.images import load_rgb
from dist_reid.engine.trained import load_trained_model
from dist_reid.evaluation.features import extract_features
from dist_reid.evaluation.protocols import cosine_distance
from dist_reid.viz.plots import (
    grad_cam,
    plot_attention,
    plot_distance_histogram,
    plot_ranked_gallery,
    plot_tsne,
)

log = logging.getLogger(__name__)


def model_figures(
    cfg: ExperimentConfig,
    checkpoint: str | None,
    out_dir: str | Path,
    *,
    trial: int = 0,
    num_queries: int = 4,
    checkpoint_state: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Distance histogram, t-SNE, ranked galleries and Grad-CAM of one trial of the protocol.
    ``checkpoint_state``: the checkpoint's contents when the caller has read them already."""
    out = Path(out_dir)
    dataset = build_dataset(cfg)
    if checkpoint:
        model = load_trained_model(checkpoint, cfg, dataset.num_train_ids, state=checkpoint_state)
    else:
        model = build_model(cfg, dataset.num_train_ids, pretrained=False)  # untrained
    plan = evaluation_plan(cfg, dataset)
    transform = plan.transform()
    setting = plan.settings[0]
    trial = trial if trial in plan.trials else plan.trials[0]  # a RegDB model: its own trial
    query, gallery = dataset.split(setting, trial, **plan.split_options)
    q = extract_features(model, query, transform, batch_size=plan.batch_size, flip=plan.flip)
    g = extract_features(model, gallery, transform, batch_size=plan.batch_size, flip=plan.flip)
    dist = cosine_distance(q, g)
    q_ids = np.array([r.pid for r in query])
    g_ids = np.array([r.pid for r in gallery])
    paths = [
        plot_distance_histogram(
            dist,
            q_ids,
            g_ids,
            out / "distance_histogram.png",
            title=f"{dataset.name} {setting}",
            xlabel="cross-modal distance (-cosine similarity)",
        )
    ]
    feats = np.concatenate([q, g])
    paths.append(
        plot_tsne(
            feats,
            [r.pid for r in (*query, *gallery)],
            [r.modality for r in (*query, *gallery)],
            out / "tsne.png",
        )
    )
    picks = np.linspace(0, len(query) - 1, min(num_queries, len(query))).astype(int)
    paths.append(plot_ranked_gallery(query, gallery, dist, picks, out / "ranked_gallery.png"))
    layer = getattr(getattr(model, "backbone", None), "stages", None)
    if layer is not None:
        records = [query[i] for i in picks[:3]] + list(gallery[:3])
        cams, images = [], []
        for record in records:
            image = load_rgb(record.path)
            tensor = transform(image).unsqueeze(0)
            cams.append(grad_cam(model, layer[-1], tensor, record.modality)[0])
            images.append(image.resize((cfg.data.width, cfg.data.height)))
        paths.append(
            plot_attention(
                images,
                torch.stack(cams),
                out / "grad_cam.png",
                [f"{r.modality[:3]} id {r.pid}" for r in records],
            )
        )
    else:
        log.info("no backbone.stages on %s: Grad-CAM skipped", type(model).__name__)
    return paths
