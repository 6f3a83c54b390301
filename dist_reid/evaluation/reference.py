"""Per-query loop evaluation, computed step by step the way the community code does it.

This is the ground truth for the tests of :mod:`dist_reid.evaluation.metrics` and the baseline of
``dist-reid bench eval``.  It is slow on purpose: one Python iteration per query, and inside it a
Python-level pass over every ranked gallery position to build the precision curve, exactly the
cost profile of the AGW / DEEN ``eval_sysu`` / ``eval_llcm`` / ``eval_regdb`` functions.  Do not
use it for real evaluations; use :func:`dist_reid.evaluation.metrics.evaluate`.

It deliberately shares nothing with the vectorised code except the protocol table: labels are
compared as given (no re-coding), distinct identities come from a first-seen ordered dict rather
than a sort, and the per-query CMC rows are stacked and summed in float32 as the reference does.

The one intended difference from the community code (protocols.md pitfall 14): a per-query curve
shorter than ``max_rank`` (few kept items or few distinct identities) is padded with its last
value instead of producing a ragged array.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dist_reid.evaluation.metrics import MetricProtocol, resolve_protocol


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _dropped(
    proto: MetricProtocol,
    q_id: Any,
    q_cam: Any,
    ranked_ids: np.ndarray,
    ranked_cams: np.ndarray | None,
) -> np.ndarray:
    """Which ranked gallery items one query must ignore."""
    if proto.exclusion == "none":
        return np.zeros(ranked_ids.shape, dtype=bool)
    assert ranked_cams is not None
    if proto.exclusion == "same_id_same_camera":
        return (ranked_ids == q_id) & (ranked_cams == q_cam)
    dropped = np.zeros(ranked_ids.shape, dtype=bool)
    for query_cam, gallery_cam in proto.camera_pairs:
        if q_cam == query_cam:  # camera rule: identity plays no part
            dropped |= ranked_cams == gallery_cam
    return dropped


def reference_evaluate(
    distmat: Any,
    query_ids: Any,
    gallery_ids: Any,
    query_cams: Any,
    gallery_cams: Any,
    protocol: str | MetricProtocol,
    max_rank: int = 20,
) -> tuple[np.ndarray, float, float]:
    """``(cmc, mAP, mINP)`` with one Python iteration per query (slow on purpose; see module doc).

    ``cmc`` is a float32 array of length ``min(max_rank, gallery size)``.  Raises ``ValueError``
    when no query keeps a true match after filtering (the community code asserts).
    """
    proto = resolve_protocol(protocol)
    dist = _as_array(distmat)
    q_ids, g_ids = _as_array(query_ids), _as_array(gallery_ids)
    q_cams = g_cams = None
    if proto.uses_cameras:
        q_cams, g_cams = _as_array(query_cams), _as_array(gallery_cams)
    num_q, num_g = dist.shape
    max_rank = min(max_rank, num_g)

    order = np.argsort(dist, axis=1)  # numpy's default kind, as in the community code
    curves: list[np.ndarray] = []
    average_precisions: list[float] = []
    inverse_penalties: list[float] = []
    for q in range(num_q):
        ranked_ids = g_ids[order[q]]
        ranked_cams = None if g_cams is None else g_cams[order[q]]
        q_cam = None if q_cams is None else q_cams[q]
        kept_ids = ranked_ids[~_dropped(proto, q_ids[q], q_cam, ranked_ids, ranked_cams)]
        is_match = (kept_ids == q_ids[q]).astype(np.int32)
        if not is_match.any():
            continue  # invalid query: absent from every metric

        hits_so_far = np.cumsum(is_match)
        # precision at each 1-based position, one Python step per position like the reference
        precision = np.asarray([hits_so_far[i] / (i + 1.0) for i in range(len(hits_so_far))])
        num_rel = is_match.sum()
        average_precisions.append(float((precision * is_match).sum() / num_rel))
        hardest = int(np.flatnonzero(is_match)[-1])
        inverse_penalties.append(float(hits_so_far[hardest] / (hardest + 1.0)))

        if proto.cmc == "identity":
            # first occurrence of every identity, in ranked order
            distinct = list(dict.fromkeys(kept_ids.tolist()))
            found = (np.asarray(distinct) == q_ids[q]).astype(np.int32).cumsum()
        else:
            found = np.minimum(hits_so_far, 1)
        curve = found[:max_rank]
        if len(curve) < max_rank:  # pitfall 14: the reference would go ragged; stay flat instead
            curve = np.concatenate([curve, np.full(max_rank - len(curve), curve[-1])])
        curves.append(curve)

    if not curves:
        raise ValueError("no valid query: every query identity lacks a true match after filtering")
    cmc = np.asarray(curves).astype(np.float32).sum(0) / float(len(curves))
    return cmc, float(np.mean(average_precisions)), float(np.mean(inverse_penalties))


__all__ = ["reference_evaluate"]
