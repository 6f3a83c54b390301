"""Cross-modality re-id metrics (CMC, mAP, mINP), vectorised, equal to the community reference.

Semantics follow the community reference evaluation code (AGW / DEEN ``eval_metrics``):

* Ranking: every row of the distance matrix is ordered by ``np.argsort(row)`` with numpy's
  default sort kind, the same call the reference makes, so ties are broken identically on the
  same numpy build (the default kind is not stable; with SIMD sorts it really reorders ties).
* Filtering (per query, data-driven by :class:`MetricProtocol`): SYSU drops every camera-2
  gallery item for camera-3 queries whatever its identity; LLCM drops gallery items sharing the
  query's identity *and* camera; RegDB drops nothing.  Positions below are 1-based positions in
  the filtered ranked list.
* A query is valid when at least one true match survives the filter.  Invalid queries are
  left out of CMC, mAP and mINP alike (numerator and denominator).  No valid query at all is a
  ``ValueError`` (the reference asserts).
* With R surviving true matches at positions p_1 < ... < p_R:
  ``AP = (1/R) * sum_k k / p_k`` and ``INP = R / p_R``; mAP / mINP are means over valid queries.
* CMC from the 0-based rank r of the first true match: image-level (RegDB) r = p_1 - 1;
  identity-collapsed (SYSU, LLCM) r = number of distinct identities whose first surviving
  occurrence comes before p_1.  ``CMC(k) = #{valid queries with r < k} / #valid`` for
  k = 1..max_rank, max_rank clipped to the gallery size.  Counts are turned into a float32
  curve with the same float32 arithmetic as the reference, so the curves are bit-identical.

Departure from the reference (pitfall 14): when a query's filtered list holds fewer than
``max_rank`` items (or, collapsed, fewer distinct identities), the reference builds a ragged
array and crashes (numpy >= 1.24), or silently returns a *shorter* curve when every row happens
to be equally short.  Here the cumulative curve simply stays at its last value past the end of
the short list, which is what the per-rank definition above gives.

Identity and camera labels must be integer arrays (numpy or torch); distances any real dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

CmcKind = Literal["identity", "image"]
Exclusion = Literal["none", "camera_pairs", "same_id_same_camera"]

# Row chunks are sized so that one (rows x gallery) int64 array stays near 32 MiB; a handful of
# such temporaries live at once, so peak extra memory is a few hundred MiB at any gallery size.
_CHUNK_ELEMENTS = 1 << 22
_MAX_CHUNK_ROWS = 2048
# Leading window (columns) first tried for the identity-collapsed rank; galleries with a few
# images per identity settle almost every row inside it (see _collapsed_first_rank).
_COLLAPSE_WINDOW = 256


@dataclass(frozen=True)
class MetricProtocol:
    """How one benchmark filters each query's gallery and which CMC variant it reports.

    ``exclusion``:
      * ``"none"``: keep every gallery item (RegDB);
      * ``"camera_pairs"``: for a query of camera ``qc`` drop every gallery item of camera ``gc``
        for each ``(qc, gc)`` in ``camera_pairs``, whatever its identity (SYSU: ``((3, 2),)``);
      * ``"same_id_same_camera"``: drop gallery items with the query's identity and camera (LLCM).
    ``cmc``: ``"identity"`` (identity-collapsed, first occurrence of each id) or ``"image"``.
    """

    name: str
    cmc: CmcKind = "identity"
    exclusion: Exclusion = "none"
    camera_pairs: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.cmc not in ("identity", "image"):
            raise ValueError(
                f"protocol {self.name!r}: cmc must be 'identity' or 'image', got {self.cmc!r}"
            )
        if self.exclusion not in ("none", "camera_pairs", "same_id_same_camera"):
            raise ValueError(f"protocol {self.name!r}: unknown exclusion {self.exclusion!r}")
        if (self.exclusion == "camera_pairs") != bool(self.camera_pairs):
            raise ValueError(
                f"protocol {self.name!r}: camera_pairs must be given exactly when exclusion='camera_pairs'"
            )

    @property
    def uses_cameras(self) -> bool:
        """Whether the filter reads camera labels (RegDB's does not)."""
        return self.exclusion != "none"


METRIC_PROTOCOLS: Mapping[str, MetricProtocol] = {
    # Official SYSU rule: cam2 (RGB) and cam3 (IR) film the same room, so cam3 probes skip all cam2.
    "sysu": MetricProtocol(
        "sysu", cmc="identity", exclusion="camera_pairs", camera_pairs=((3, 2),)
    ),
    # DEEN eval_llcm: Market-style junk removal (same id AND same camera).
    "llcm": MetricProtocol("llcm", cmc="identity", exclusion="same_id_same_camera"),
    # Reference gives all queries cam 1 and all gallery items cam 2: its filter never fires.
    "regdb": MetricProtocol("regdb", cmc="image", exclusion="none"),
}


@dataclass(frozen=True, eq=False)
class EvalResult:
    """Metrics of one evaluation; ``cmc`` and the scalars are fractions in [0, 1].

    ``cmc[k-1]`` is CMC at rank k (float32, cumulative, length = max_rank clipped to the gallery
    size).  ``num_valid`` counts queries that kept at least one true match after filtering.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid: int
    num_queries: int
    num_gallery: int
    protocol: str

    def rank(self, k: int) -> float:
        """CMC at rank ``k`` (1-based) as a fraction.

        Past the end of the curve the value is known only when the curve already covers the whole
        gallery (max_rank was clipped): every valid query has found its match by then, so it is flat.
        """
        if k < 1:
            raise ValueError(f"rank must be >= 1, got {k}")
        if k <= len(self.cmc):
            return float(self.cmc[k - 1])
        if len(self.cmc) == self.num_gallery:
            return float(self.cmc[-1])
        raise ValueError(f"rank {k} is beyond the computed CMC curve (max_rank={len(self.cmc)})")

    def as_dict(self, ranks: tuple[int, ...] = (1, 5, 10, 20)) -> dict[str, float]:
        """``{"R1": .., "R5": .., "R10": .., "R20": .., "mAP": .., "mINP": ..}`` in percent.

        Ranks the curve cannot answer (max_rank chosen smaller than k) are left out.
        """
        out: dict[str, float] = {}
        for k in ranks:
            if k <= len(self.cmc) or len(self.cmc) == self.num_gallery:
                out[f"R{k}"] = 100.0 * self.rank(k)
        out["mAP"] = 100.0 * self.mAP
        out["mINP"] = 100.0 * self.mINP
        return out

    def format(self, ranks: tuple[int, ...] = (1, 5, 10, 20)) -> str:
        """One log line, e.g. ``R1 55.12% | R5 ... | mAP 53.01% | mINP 39.80% (valid 3803/3803)``."""
        parts = [f"{key} {value:.2f}%" for key, value in self.as_dict(ranks).items()]
        return " | ".join(parts) + f" (valid {self.num_valid}/{self.num_queries})"

    def __str__(self) -> str:
        return f"[{self.protocol}] {self.format()}"


# --------------------------------------------------------------------------------------------
# input handling


def _to_numpy(value: Any, name: str) -> np.ndarray:
    """numpy view of a numpy array, torch tensor or sequence (no torch import needed)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, duck-typed
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
            value = value.float()
        value = value.numpy()
    try:
        return np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name}: cannot convert {type(value).__name__} to an array") from exc


def _label_vector(value: Any, name: str, length: int) -> np.ndarray:
    arr = _to_numpy(value, name)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise ValueError(f"{name} must be a 1-D vector of length {length}, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")
    return arr


def resolve_protocol(protocol: str | MetricProtocol) -> MetricProtocol:
    """Look a protocol up by name (case-insensitive) or pass a :class:`MetricProtocol` through."""
    if isinstance(protocol, MetricProtocol):
        return protocol
    key = str(protocol).lower()
    if key not in METRIC_PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(METRIC_PROTOCOLS)}, got {protocol!r}")
    return METRIC_PROTOCOLS[key]


@dataclass(frozen=True)
class _Inputs:
    distmat: np.ndarray
    query_codes: np.ndarray  # dense gallery-id codes; -1 = id absent from the gallery
    gallery_codes: np.ndarray
    num_codes: int
    query_cams: np.ndarray | None
    gallery_cams: np.ndarray | None
    max_rank: int


def prepare_inputs(
    distmat: Any,
    query_ids: Any,
    gallery_ids: Any,
    query_cams: Any,
    gallery_cams: Any,
    proto: MetricProtocol,
    max_rank: int,
) -> _Inputs:
    """Validate shapes/dtypes and map identities to dense codes 0..U-1 (shared with the reference)."""
    dist = _to_numpy(distmat, "distmat")
    if dist.ndim != 2:
        raise ValueError(f"distmat must be 2-D (queries x gallery), got shape {dist.shape}")
    if not (np.issubdtype(dist.dtype, np.floating) or np.issubdtype(dist.dtype, np.integer)):
        raise ValueError(f"distmat must hold real numbers, got dtype {dist.dtype}")
    num_q, num_g = dist.shape
    if num_g == 0:
        raise ValueError("distmat has an empty gallery (0 columns)")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int | np.integer) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
    q_ids = _label_vector(query_ids, "query_ids", num_q)
    g_ids = _label_vector(gallery_ids, "gallery_ids", num_g)
    q_cams = g_cams = None
    # Cameras are required where the filter reads them; elsewhere they are checked if given and ignored.
    if proto.uses_cameras or query_cams is not None:
        if query_cams is None:
            raise ValueError(f"query_cams is required by protocol {proto.name!r}")
        q_cams = _label_vector(query_cams, "query_cams", num_q)
    if proto.uses_cameras or gallery_cams is not None:
        if gallery_cams is None:
            raise ValueError(f"gallery_cams is required by protocol {proto.name!r}")
        g_cams = _label_vector(gallery_cams, "gallery_cams", num_g)

    # Dense codes make the identity comparisons cheap int32 work and let identity and column be
    # packed into one sortable integer key (see _collapsed_first_rank).
    uniq, g_codes = np.unique(g_ids, return_inverse=True)
    where = np.clip(np.searchsorted(uniq, q_ids), 0, len(uniq) - 1)
    q_codes = np.where(uniq[where] == q_ids, where, -1)
    return _Inputs(
        distmat=dist,
        query_codes=q_codes.astype(np.int32),
        gallery_codes=g_codes.reshape(-1).astype(np.int32),
        num_codes=len(uniq),
        query_cams=q_cams,
        gallery_cams=g_cams,
        max_rank=min(int(max_rank), num_g),  # clipped like the reference
    )


# --------------------------------------------------------------------------------------------
# vectorised core


def _removed_mask(
    proto: MetricProtocol,
    order: np.ndarray,
    match: np.ndarray,
    q_cams: np.ndarray | None,
    g_cams: np.ndarray | None,
) -> np.ndarray | None:
    """Boolean (rows x gallery) mask in ranked order of items the protocol drops; None = nothing."""
    if proto.exclusion == "none":
        return None
    assert q_cams is not None and g_cams is not None
    if proto.exclusion == "same_id_same_camera":
        return match & (g_cams[order] == q_cams[:, None])
    removed = np.zeros(order.shape, dtype=bool)
    for q_cam, g_cam in proto.camera_pairs:
        rows = np.flatnonzero(q_cams == q_cam)
        if rows.size:
            # Only rows of the affected query camera pay for the gather.
            removed[rows] |= (g_cams == g_cam)[order[rows]]
    return removed if removed.any() else None


def _distinct_before(
    codes: np.ndarray, kept: np.ndarray | None, limit: np.ndarray, num_codes: int
) -> np.ndarray:
    """Per row, the number of distinct identities among kept items in columns ``< limit``.

    Each kept item gets the key ``code * W + column`` (dropped items a sentinel code), so a plain
    row sort groups equal identities with their earliest column first: the head of each group is
    that identity's first kept occurrence.  Counting group heads whose column is below ``limit``
    counts identities first seen there.
    """
    width = codes.shape[1]
    key_dtype = np.int32 if (num_codes + 1) * width < np.iinfo(np.int32).max else np.int64
    keys = (codes if kept is None else np.where(kept, codes, num_codes)).astype(key_dtype)
    keys *= width
    keys += np.arange(width, dtype=key_dtype)
    keys.sort(axis=1)  # keys are distinct integers, so every sort kind gives the same result
    key_codes = keys // width
    head = np.empty(keys.shape, dtype=bool)
    head[:, 0] = True
    np.not_equal(key_codes[:, 1:], key_codes[:, :-1], out=head[:, 1:])
    head &= key_codes < num_codes
    head &= (keys - key_codes * width) < limit[:, None]
    return head.sum(axis=1)


def _collapsed_first_rank(
    ranked_codes: np.ndarray,
    kept: np.ndarray | None,
    first_col: np.ndarray,
    valid: np.ndarray,
    num_codes: int,
    cap: int,
) -> np.ndarray:
    """Identity-collapsed 0-based rank of the first true match (exact below ``cap``).

    The rank is the number of distinct identities whose first kept occurrence lies before column
    ``first_col`` (the query's own id first occurs exactly there, so it is not counted).  Only
    ranks below ``cap`` (= max_rank) affect the CMC, and the count over a prefix only grows with
    the prefix, so each row is settled on a narrow leading window once either its first match lies
    inside the window or the window already holds ``cap`` distinct identities.  Unsettled rows
    retry on a 4x wider window.  Returned values >= cap mean "not within max_rank".
    """
    num_g = ranked_codes.shape[1]
    result = np.zeros(ranked_codes.shape[0], dtype=np.int64)
    todo = np.flatnonzero(valid)
    width = max(_COLLAPSE_WINDOW, 1)
    while todo.size:
        width = min(width, num_g)
        row_first = first_col[todo]
        count = _distinct_before(
            ranked_codes[todo, :width],
            None if kept is None else kept[todo, :width],
            np.minimum(row_first, width),
            num_codes,
        )
        settled = (row_first <= width) | (count >= cap) | (width == num_g)
        result[todo[settled]] = count[settled]
        todo = todo[~settled]
        width *= 4
    return result


def _evaluate_rows(
    inputs: _Inputs, proto: MetricProtocol, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-query (valid, first-match rank, AP, INP) for rows start:stop; invalid rows get junk."""
    # A row slice is a view: argsort sees exactly the rows the reference's whole-matrix call sees.
    dist = inputs.distmat[start:stop]
    q_codes = inputs.query_codes[start:stop]
    q_cams = None if inputs.query_cams is None else inputs.query_cams[start:stop]
    rows_n = dist.shape[0]

    order = np.argsort(dist, axis=1)  # same call as the reference -> same tie order
    ranked_codes = inputs.gallery_codes[order]
    match = ranked_codes == q_codes[:, None]
    removed = _removed_mask(proto, order, match, q_cams, inputs.gallery_cams)
    del order
    kept = None if removed is None else ~removed
    hit = match if kept is None else (match & kept)
    del match, removed

    num_rel = hit.sum(axis=1)
    valid = num_rel > 0
    if not valid.any():  # nothing to score in this chunk; callers drop invalid rows anyway
        zeros = np.zeros(rows_n)
        return valid, np.zeros(rows_n, np.int64), zeros, zeros
    hit_rows, hit_cols = np.nonzero(hit)  # row-major: grouped by row, columns ascending
    del hit
    if kept is None:
        hit_pos = hit_cols + 1
    else:
        # 1-based position in the filtered list = number of kept items up to and including this one.
        positions = np.cumsum(kept, axis=1, dtype=np.int32)
        hit_pos = positions[hit_rows, hit_cols]
        del positions
    row_start = np.zeros(rows_n, dtype=np.int64)
    np.cumsum(num_rel[:-1], out=row_start[1:])
    hit_k = np.arange(hit_rows.size) - row_start[hit_rows] + 1  # k-th true match of its row

    # AP = (1/R) sum_k k/p_k ; INP = R / p_R.  Guard the division for invalid rows (R = 0).
    safe_rel = np.maximum(num_rel, 1)
    ap = np.bincount(hit_rows, weights=hit_k / hit_pos, minlength=rows_n) / safe_rel
    # Indices of each row's first / last hit; clipped so invalid rows index something harmless.
    first_idx = np.minimum(row_start, hit_rows.size - 1)
    last_idx = np.maximum(row_start + num_rel - 1, 0)
    inp = num_rel / hit_pos[last_idx].astype(np.float64)

    if proto.cmc == "image":
        first_rank = hit_pos[first_idx].astype(np.int64) - 1
    else:
        first_col = hit_cols[first_idx]
        first_rank = _collapsed_first_rank(
            ranked_codes, kept, first_col, valid, inputs.num_codes, inputs.max_rank
        )
    return valid, first_rank, ap, inp


def default_chunk_rows(num_gallery: int) -> int:
    """Query rows processed at once by :func:`evaluate` for a gallery of this size."""
    return max(1, min(_MAX_CHUNK_ROWS, _CHUNK_ELEMENTS // max(num_gallery, 1)))


def evaluate(
    distmat: Any,
    query_ids: Any,
    gallery_ids: Any,
    query_cams: Any = None,
    gallery_cams: Any = None,
    protocol: str | MetricProtocol = "sysu",
    max_rank: int = 20,
    *,
    chunk_rows: int | None = None,
) -> EvalResult:
    """CMC / mAP / mINP of a (queries x gallery) distance matrix under a benchmark protocol.

    Smaller distance = more similar.  ``protocol`` is ``"sysu"``, ``"llcm"``, ``"regdb"`` or a
    :class:`MetricProtocol`.  Cameras are required by SYSU and LLCM, ignored by RegDB.
    ``chunk_rows`` bounds memory (rows processed at once; default keeps temporaries near 32 MiB
    each); the result does not depend on it.  Raises ``ValueError`` on shape/dtype mismatch or
    when no query keeps a true match after filtering.
    """
    proto = resolve_protocol(protocol)
    inputs = prepare_inputs(
        distmat, query_ids, gallery_ids, query_cams, gallery_cams, proto, max_rank
    )
    num_q, num_g = inputs.distmat.shape
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(num_g)
    elif chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")

    valid_parts, rank_parts, ap_parts, inp_parts = [], [], [], []
    for start in range(0, num_q, chunk_rows):  # loop over fixed-size chunks, not over queries
        valid, first_rank, ap, inp = _evaluate_rows(
            inputs, proto, start, min(start + chunk_rows, num_q)
        )
        valid_parts.append(valid)
        rank_parts.append(first_rank[valid])
        ap_parts.append(ap[valid])
        inp_parts.append(inp[valid])

    num_valid = int(sum(int(v.sum()) for v in valid_parts))
    if num_valid == 0:
        raise ValueError(
            f"no valid query under protocol {proto.name!r}: no query identity keeps a true match "
            "in its filtered gallery (the reference code asserts here)"
        )
    first_rank = np.concatenate(rank_parts)
    # CMC(k) counts valid queries with first-match rank < k; ranks >= max_rank never count.
    hist = np.bincount(first_rank[first_rank < inputs.max_rank], minlength=inputs.max_rank)
    counts = np.cumsum(hist)
    # Same arithmetic as the reference: exact integer counts in float32 divided by a Python float.
    cmc = counts.astype(np.float32) / float(num_valid)
    cmc.setflags(write=False)
    # Means over the valid queries in query order (same order the reference appends them).
    return EvalResult(
        cmc=cmc,
        mAP=float(np.mean(np.concatenate(ap_parts))),
        mINP=float(np.mean(np.concatenate(inp_parts))),
        num_valid=num_valid,
        num_queries=num_q,
        num_gallery=num_g,
        protocol=proto.name,
    )


__all__ = [
    "METRIC_PROTOCOLS",
    "EvalResult",
    "MetricProtocol",
    "default_chunk_rows",
    "evaluate",
    "resolve_protocol",
]
