"""Post-processing users reach for after training, reported apart from the plain numbers:
k-reciprocal re-ranking (Zhong et al., CVPR 2017) and average query expansion.

The re-ranking never builds an (N x N) matrix for N = queries + gallery: distances are computed
in row chunks to find each image's k1+1 nearest neighbours, the k-reciprocal encodings V are kept
sparse (about k1 entries a row), and the Jaccard distance is accumulated through an inverted
index, so LLCM-sized galleries fit in memory. It equals the usual dense formulation (tested).
"""

from __future__ import annotations

import numpy as np


def _pairwise(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return 1.0 - an @ bn.T
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def _neighbours(
    feats: np.ndarray, metric: str, k: int, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's largest distance (the original code divides row i of the symmetric matrix by
    it, via a column max and a transpose) and its k nearest neighbours in order."""
    n = len(feats)
    col_max = np.zeros(n)
    for start in range(0, n, chunk):
        col_max = np.maximum(
            col_max, _pairwise(feats[start : start + chunk], feats, metric).max(axis=0)
        )
    col_max = np.maximum(col_max, 1e-12)
    ranks = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        d = (
            _pairwise(feats[start : start + chunk], feats, metric)
            / col_max[start : start + chunk, None]
        )
        top = (
            np.argpartition(d, kth=min(k, n - 1) - 1, axis=1)[:, :k]
            if k < n
            else np.tile(np.arange(n), (len(d), 1))
        )
        order = np.argsort(np.take_along_axis(d, top, axis=1), axis=1, kind="stable")
        ranks[start : start + chunk] = np.take_along_axis(top, order, axis=1)
    return col_max, ranks


def _k_reciprocal(ranks: np.ndarray, i: int, k: int) -> np.ndarray:
    forward = ranks[i, : k + 1]
    backward = ranks[forward, : k + 1]
    return forward[(backward == i).any(axis=1)]


def k_reciprocal_rerank(
    query: np.ndarray,
    gallery: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "euclidean",
    chunk: int = 2048,
) -> np.ndarray:
    """Re-ranked (Q x G) distances: ``lambda * d_original + (1 - lambda) * d_jaccard``.

    ``metric``: ``"euclidean"`` (squared, as the original code) or ``"cosine"``; row i of the
    original distance over all N = Q + G images is divided by its maximum, as in the original.
    """
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    feats = np.concatenate([query, gallery]).astype(np.float64)
    nq, n = len(query), len(feats)
    k1 = min(k1, n - 1)
    col_max, ranks = _neighbours(feats, metric, k1 + 1, chunk)
    half = int(np.around(k1 / 2))
    rows, cols, vals = [], [], []
    for i in range(n):
        base = _k_reciprocal(ranks, i, k1)
        expanded = base
        for candidate in base:
            cand = _k_reciprocal(ranks, candidate, half)
            if len(np.intersect1d(cand, base)) > 2 / 3 * len(cand):
                expanded = np.append(expanded, cand)
        expanded = np.unique(expanded)
        weights = np.exp(-_pairwise(feats[i : i + 1], feats[expanded], metric)[0] / col_max[i])
        rows.append(np.full(len(expanded), i))
        cols.append(expanded)
        vals.append(weights / weights.sum())
    v_rows, v_cols, v_vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    if k2 != 1:  # local query expansion: V_i = mean of V over i's k2 nearest neighbours
        dense_rows: list[dict[int, float]] = [{} for _ in range(n)]
        for r, c, v in zip(v_rows, v_cols, v_vals, strict=True):
            dense_rows[r][c] = v
        rows, cols, vals = [], [], []
        for i in range(n):
            acc: dict[int, float] = {}
            for j in ranks[i, :k2]:
                for c, v in dense_rows[j].items():
                    acc[c] = acc.get(c, 0.0) + v
            keys = np.fromiter(acc, dtype=np.int64, count=len(acc))
            rows.append(np.full(len(keys), i))
            cols.append(keys)
            vals.append(np.fromiter(acc.values(), dtype=np.float64, count=len(acc)) / k2)
        v_rows, v_cols, v_vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    # Inverted index: for every column, the rows with a non-zero V and their values.
    by_col = np.lexsort((v_rows, v_cols))
    inv_rows, inv_vals, inv_cols = v_rows[by_col], v_vals[by_col], v_cols[by_col]
    col_start = np.searchsorted(inv_cols, np.arange(n + 1))
    row_start = np.searchsorted(v_rows, np.arange(n + 1))  # v_rows is sorted by construction
    out = np.empty((nq, n - nq))
    for i in range(nq):
        temp_min = np.zeros(n)
        for t in range(row_start[i], row_start[i + 1]):
            c, v = v_cols[t], v_vals[t]
            lo, hi = col_start[c], col_start[c + 1]
            np.add.at(temp_min, inv_rows[lo:hi], np.minimum(v, inv_vals[lo:hi]))
        jaccard = 1.0 - temp_min / (2.0 - temp_min)
        original = _pairwise(feats[i : i + 1], feats[nq:], metric)[0] / col_max[i]
        out[i] = jaccard[nq:] * (1 - lambda_value) + original * lambda_value
    return out


def average_query_expansion(query: np.ndarray, gallery: np.ndarray, k: int = 5) -> np.ndarray:
    """Each query replaced by the mean of itself and its k most similar gallery features
    (cosine), then re-normalised (average query expansion)."""
    qn = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    gn = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    top = np.argsort(-(qn @ gn.T), axis=1, kind="stable")[:, :k]
    expanded = (qn + gn[top].sum(axis=1)) / (k + 1)
    return expanded / np.maximum(np.linalg.norm(expanded, axis=1, keepdims=True), 1e-12)
