"""Evaluation: reference-exact metrics, protocol drivers, feature extraction."""

from dist_reid.evaluation.metrics import METRIC_PROTOCOLS, EvalResult, MetricProtocol, evaluate
from dist_reid.evaluation.protocols import (
    ProtocolReport,
    SettingReport,
    cosine_distance,
    run_protocol,
)

__all__ = [
    "METRIC_PROTOCOLS",
    "EvalResult",
    "MetricProtocol",
    "ProtocolReport",
    "SettingReport",
    "cosine_distance",
    "evaluate",
    "run_protocol",
]
