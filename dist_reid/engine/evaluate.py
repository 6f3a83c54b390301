"""The evaluation job: features (from a model or a saved file) -> full protocol -> report."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dist_reid.builders import build_dataset, build_model, evaluation_plan
from dist_reid.config import ExperimentConfig, save_config
from dist_reid.data.datasets import VIReIDDataset
from dist_reid.data.records import Record
from dist_reid.engine.cpu_threads import configure_threads
from dist_reid.engine.trained import evaluation_dir, load_trained_model
from dist_reid.evaluation.features import FeatureCache, extract_features
from dist_reid.evaluation.protocols import (
    METRIC_NAMES,
    EvaluationPlan,
    FeatureFn,
    ProtocolReport,
    cosine_distance,
    run_protocol,
)
from dist_reid.evaluation.rerank import average_query_expansion, k_reciprocal_rerank

log = logging.getLogger(__name__)


def model_features(
    cfg: ExperimentConfig,
    plan: EvaluationPlan,
    checkpoint: str | None,
    console: Console,
    num_classes: int,
    checkpoint_state: Mapping[str, Any] | None = None,
) -> FeatureCache:
    if checkpoint is not None:
        model = load_trained_model(checkpoint, cfg, num_classes, state=checkpoint_state)
    else:
        model = build_model(cfg, num_classes, pretrained=False)  # an untrained floor
    transform = plan.transform()
    configure_threads()  # one process: every usable core (or OMP_NUM_THREADS)

    def compute(records: Sequence[Record]) -> np.ndarray:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"features of {len(records)} images", total=len(records))
            return extract_features(
                model,
                records,
                transform,
                batch_size=plan.batch_size,
                num_workers=cfg.data.num_workers,
                flip=plan.flip,
                progress=lambda n: progress.advance(task, n),
            )

    return FeatureCache(compute)


def per_trial(source: str, open_one) -> FeatureFn:
    """Features per trial when ``source`` has a ``{trial}`` placeholder, else one source for all."""
    if "{trial}" not in source:
        return open_one(source)
    caches: dict[int, FeatureCache] = {}

    def features_for(records: Sequence[Record], trial: int) -> np.ndarray:
        if trial not in caches:
            caches[trial] = open_one(source.format(trial=trial))
        return caches[trial](records, trial)

    return features_for


def saved_features(path: str, dataset: VIReIDDataset) -> FeatureCache:
    """Features saved by ``dist-reid extract``: paths stored relative to the dataset root."""
    try:
        with np.load(path, allow_pickle=False) as data:
            rel, feats = data["paths"], data["features"]
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(
            f"features file {path}: cannot read 'paths' and 'features': {exc}"
        ) from None
    return FeatureCache.from_arrays([str(dataset.root / p) for p in rel], feats)


def save_features(
    path: str | Path, dataset: VIReIDDataset, records: Sequence[Record], feats: np.ndarray
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rel = np.array([os.path.relpath(r.path, dataset.root) for r in records])
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, paths=rel, features=feats.astype(np.float32))
    os.replace(tmp, path)
    return path


def post_processing_label(cfg: ExperimentConfig) -> str:
    parts = (["qe"] if cfg.eval.query_expansion else []) + (["rerank"] if cfg.eval.rerank else [])
    return "+" + "+".join(parts)


def post_processed_distance(cfg: ExperimentConfig):
    """Distance with average query expansion and/or k-reciprocal re-ranking (cosine base)."""
    e = cfg.eval

    def distance(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        if e.query_expansion:
            query = average_query_expansion(query, gallery, e.query_expansion)
        if e.rerank:
            return k_reciprocal_rerank(
                query, gallery, e.rerank_k1, e.rerank_k2, e.rerank_lambda, metric="cosine"
            )
        return cosine_distance(query, gallery)

    return distance


def render_table(report: ProtocolReport, console: Console) -> None:
    table = Table(title=f"{report.dataset}: mean ± std over trials (%), chance = random ranking")
    table.add_column("setting")
    table.add_column("trials", justify="right")
    for name in METRIC_NAMES:
        table.add_column(name, justify="right")
    for s in report.settings:
        mean, std, chance = s.mean(), s.std(), s.chance_mean()
        table.add_row(
            s.setting, str(len(s.trials)), *[f"{mean[m]:.2f} ± {std[m]:.2f}" for m in METRIC_NAMES]
        )
        if chance:
            table.add_row(
                f"{s.setting} chance",
                str(len(s.trials)),
                *[f"{chance[m]:.2f}" for m in METRIC_NAMES],
                style="dim",
            )
    console.print(table)


def run_evaluation(
    cfg: ExperimentConfig,
    *,
    checkpoint: str | None = None,
    features: str | None = None,
    untrained: bool = False,
    console: Console | None = None,
    out_dir: str | Path | None = None,
    checkpoint_state: Mapping[str, Any] | None = None,
) -> ProtocolReport:
    """Run the dataset's full protocol and write config, metrics JSON and table to ``out_dir``
    (default: a new ``<run>/eval/<UTC time>/``, see :func:`evaluation_dir`; a training run's
    own files are never rewritten).

    Exactly one feature source: a checkpoint, a saved features file, or ``untrained`` (a model
    with random weights, asked for explicitly: the reference silently evaluates an untrained
    model when its checkpoint is missing, protocols.md pitfall 9). ``checkpoint_state``: the
    checkpoint's contents when the caller has read them already (one read per command).
    """
    # Piped output (CI logs, files) gets a table wide enough not to wrap.
    console = console or Console(width=None if sys.stdout.isatty() else 132)
    if sum(x is not None and x is not False for x in (checkpoint, features, untrained)) != 1:
        raise ValueError("give exactly one of --checkpoint, --features or --untrained")
    out_dir = Path(out_dir) if out_dir is not None else evaluation_dir(checkpoint, cfg)
    save_config(cfg, out_dir)
    dataset = build_dataset(cfg)
    console.print(
        f"[bold]{dataset.name}[/] at {dataset.root}: {len(dataset.train)} training images"
    )
    # One model of a per-trial dataset (RegDB) is scored on its own trial only; per-trial
    # sources ('{trial}' in the path) and an untrained model on every trial.
    every_trial = untrained or "{trial}" in str(checkpoint or features)
    plan = evaluation_plan(cfg, dataset, every_trial=every_trial)
    if untrained:
        console.print(
            f"[yellow]untrained {cfg.model.backbone} (random init): a sanity floor, not a result[/]"
        )
        feature_fn = model_features(cfg, plan, None, console, dataset.num_train_ids)
    else:
        source = str(features if features is not None else checkpoint)

        def one(path: str) -> FeatureCache:
            if features is not None:
                return saved_features(path, dataset)
            # a per-trial pattern reads each trial's file; one checkpoint may come already read
            state = checkpoint_state if path == str(checkpoint) else None
            return model_features(cfg, plan, path, console, dataset.num_train_ids, state)

        feature_fn = per_trial(source, one)
    if plan.trials != evaluation_plan(cfg, dataset, every_trial=True).trials:
        console.print(
            f"[yellow]{dataset.name}: one model, so only its own trial(s) {list(plan.trials)} "
            "are evaluated; name per-trial models with '{trial}' in the path for all[/]"
        )
    report = run_protocol(
        dataset,
        feature_fn,
        settings=plan.settings,
        trials=plan.trials,
        max_rank=plan.max_rank,
        chance_draws=cfg.eval.chance_draws,
        seed=cfg.run.seed,
        **plan.split_options,
    )
    render_table(report, console)
    payload = report.to_dict()
    markdown = report.to_markdown()
    if cfg.eval.rerank or cfg.eval.query_expansion:
        post = run_protocol(
            dataset,
            feature_fn,
            settings=plan.settings,
            trials=plan.trials,
            max_rank=plan.max_rank,
            distance=post_processed_distance(cfg),
            label=post_processing_label(cfg),
            **plan.split_options,
        )
        render_table(post, console)
        payload["post_processed"] = post.to_dict()  # never mixed into the plain numbers
        markdown += "\n\n" + post.to_markdown()
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
    (out_dir / "metrics.md").write_text(markdown + "\n")
    console.print(f"wrote {out_dir / 'metrics.json'}")
    return report
