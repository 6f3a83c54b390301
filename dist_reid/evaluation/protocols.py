"""Protocol drivers: run every setting and trial of a dataset's protocol and average them.

SYSU-MM01: all-search and indoor-search, 10 trials (0..9) of per-trial gallery draws.
RegDB: visible->thermal and thermal->visible, 10 trials (1..10), each its own split and model.
LLCM: infrared->visible and visible->infrared, 10 trials (0..9) of gallery draws.
The trial-mean of CMC, mAP and mINP is what papers report (protocols.md sections 1-4).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dist_reid.data.datasets.base import VIReIDDataset
from dist_reid.data.records import Record
from dist_reid.evaluation.metrics import EvalResult, evaluate

# (records, trial) -> (len(records), D) features. Trial-dependent for RegDB (one model per trial).
FeatureFn = Callable[[Sequence[Record], int], np.ndarray]
RANKS = (1, 5, 10, 20)
METRIC_NAMES = ("R1", "R5", "R10", "R20", "mAP", "mINP")


def all_test_records(
    dataset: VIReIDDataset, settings: Sequence[str], trials: Sequence[int], **options: bool
) -> list[Record]:
    """Every image any (setting, trial) of the protocol may use, without duplicates."""
    seen: dict[str, Record] = {}
    for setting in settings:
        for trial in trials:
            query, gallery = dataset.split(setting, trial, **options)
            for record in (*query, *gallery):
                seen.setdefault(record.path, record)
    return list(seen.values())


@dataclass(frozen=True)
class EvaluationPlan:
    """What an evaluation scores and how it takes features, decided once
    (``dist_reid.builders.evaluation_plan``) for training, ``eval``, ``extract`` and ``plot``.

    ``settings`` and ``trials`` of the protocol (a RegDB model only on its own trial, see
    :meth:`VIReIDDataset.scored_trials`), the split options, and the test transform and
    extraction settings.
    """

    settings: tuple[str, ...]
    trials: tuple[int, ...]
    multi_shot: bool = False
    transposed_v2i: bool = False
    max_rank: int = 20
    height: int = 288
    width: int = 144
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    batch_size: int = 64
    flip: bool = False

    @property
    def split_options(self) -> dict[str, bool]:
        """Keywords of :meth:`VIReIDDataset.split` and :func:`run_protocol`."""
        return {"multi_shot": self.multi_shot, "transposed_v2i": self.transposed_v2i}

    def records(self, dataset: VIReIDDataset) -> list[Record]:
        """Every test image the plan scores, once each (the features to extract)."""
        return all_test_records(dataset, self.settings, self.trials, **self.split_options)

    def transform(self):
        """The test transform (resize, tensor, normalise with the plan's mean and std)."""
        from dist_reid.data.transforms import build_test_transform

        return build_test_transform(self.height, self.width, self.mean, self.std)


def cosine_distance(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """``-(q . g)`` on L2-normalised features, the reference's distance."""
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    return -(q @ g.T)


def summarize_result(result: EvalResult) -> dict[str, float]:
    """R1/R5/R10/R20/mAP/mINP in percent (ranks past the curve's end take its last value)."""
    cmc = np.asarray(result.cmc, dtype=np.float64)
    out = {f"R{k}": 100.0 * float(cmc[min(k, len(cmc)) - 1]) for k in RANKS}
    out["mAP"] = 100.0 * result.mAP
    out["mINP"] = 100.0 * result.mINP
    return out


@dataclass
class SettingReport:
    """All trials of one setting (e.g. SYSU all-search) with their mean and std."""

    setting: str
    trials: list[int] = field(default_factory=list)
    per_trial: list[dict[str, float]] = field(default_factory=list)
    chance: list[dict[str, float]] = field(default_factory=list)  # per trial, random distances
    num_query: int = 0
    num_gallery: list[int] = field(default_factory=list)
    cmc: list[list[float]] = field(default_factory=list)  # per trial, the whole curve

    def mean(self, rows: list[dict[str, float]] | None = None) -> dict[str, float]:
        rows = self.per_trial if rows is None else rows
        return {m: float(np.mean([r[m] for r in rows])) for m in METRIC_NAMES} if rows else {}

    def std(self) -> dict[str, float]:
        return {m: float(np.std([r[m] for r in self.per_trial])) for m in METRIC_NAMES}

    def chance_mean(self) -> dict[str, float]:
        return self.mean(self.chance)


@dataclass
class ProtocolReport:
    dataset: str
    settings: list[SettingReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "settings": {
                s.setting: {
                    "trials": s.trials,
                    "mean": s.mean(),
                    "std": s.std(),
                    "chance": s.chance_mean(),
                    "per_trial": s.per_trial,
                    "num_query": s.num_query,
                    "num_gallery": s.num_gallery,
                    "cmc_mean": np.mean(np.asarray(s.cmc), axis=0).tolist() if s.cmc else [],
                }
                for s in self.settings
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        lines = [
            f"| {self.dataset} setting | trials | " + " | ".join(METRIC_NAMES) + " |",
            "|---|---|" + "---|" * len(METRIC_NAMES),
        ]
        for s in self.settings:
            mean, std, chance = s.mean(), s.std(), s.chance_mean()
            cells = [f"{mean[m]:.2f} ± {std[m]:.2f}" for m in METRIC_NAMES]
            lines.append(f"| {s.setting} | {len(s.trials)} | " + " | ".join(cells) + " |")
            if chance:
                cells = [f"{chance[m]:.2f}" for m in METRIC_NAMES]
                lines.append(
                    f"| {s.setting} (chance) | {len(s.trials)} | " + " | ".join(cells) + " |"
                )
        return "\n".join(lines)


def run_protocol(
    dataset: VIReIDDataset,
    features: FeatureFn,
    *,
    settings: Sequence[str] = (),
    trials: Sequence[int] = (),
    max_rank: int = 20,
    multi_shot: bool = False,
    transposed_v2i: bool = False,
    chance_draws: int = 0,
    seed: int = 0,
    on_trial: Callable[[str, int, dict[str, float]], None] | None = None,
    distance: Callable[[np.ndarray, np.ndarray], np.ndarray] = cosine_distance,
    label: str = "",
) -> ProtocolReport:
    """Evaluate ``features`` on every (setting, trial) of ``dataset``'s protocol.

    ``distance`` maps (query, gallery) features to distances (default: the reference's cosine;
    re-ranking passes its own, with a ``label`` such as ``"+rerank"`` so it is never mistaken
    for the plain numbers). ``chance_draws`` > 0 adds a chance column: the same query/gallery ranked by uniformly random
    distances, averaged over that many draws (seeded by ``seed``), so the table shows how far a
    model is above chance on exactly the galleries it was scored on.
    """
    settings = tuple(settings) or dataset.settings
    trials = tuple(trials) or dataset.trials
    report = ProtocolReport(dataset=dataset.name)
    rng = np.random.default_rng(seed)
    for setting in settings:
        entry = SettingReport(setting=setting + label)
        for trial in trials:
            query, gallery = dataset.split(
                setting, trial, multi_shot=multi_shot, transposed_v2i=transposed_v2i
            )
            q_ids = np.array([r.pid for r in query])
            g_ids = np.array([r.pid for r in gallery])
            q_cams = np.array([r.cam for r in query])
            g_cams = np.array([r.cam for r in gallery])
            distmat = distance(features(query, trial), features(gallery, trial))
            result = evaluate(
                distmat,
                q_ids,
                g_ids,
                q_cams,
                g_cams,
                protocol=dataset.metric_protocol,
                max_rank=max_rank,
            )
            row = summarize_result(result)
            entry.trials.append(trial)
            entry.per_trial.append(row)
            entry.cmc.append([float(v) for v in result.cmc])
            entry.num_query = len(query)
            entry.num_gallery.append(len(gallery))
            if chance_draws:
                draws = [
                    summarize_result(
                        evaluate(
                            rng.random(distmat.shape),
                            q_ids,
                            g_ids,
                            q_cams,
                            g_cams,
                            protocol=dataset.metric_protocol,
                            max_rank=max_rank,
                        )
                    )
                    for _ in range(chance_draws)
                ]
                entry.chance.append(
                    {m: float(np.mean([d[m] for d in draws])) for m in METRIC_NAMES}
                )
            if on_trial is not None:
                on_trial(setting, trial, row)
        report.settings.append(entry)
    return report
