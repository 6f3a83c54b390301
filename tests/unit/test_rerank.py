"""Sparse, chunked k-reciprocal re-ranking equals the dense textbook formulation."""

from __future__ import annotations

import numpy as np
import pytest

from dist_reid.evaluation.rerank import average_query_expansion, k_reciprocal_rerank


def dense_rerank(q: np.ndarray, g: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al.'s algorithm on the full (N x N) matrix, step by step."""
    x = np.concatenate([q, g]).astype(np.float64)
    n, nq = len(x), len(q)
    d = np.maximum((x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * x @ x.T, 0)
    d = np.transpose(d / d.max(axis=0))  # the original's normalisation, literally
    rank = np.argsort(d, axis=1, kind="stable")
    v = np.zeros((n, n))

    def recip(i, k):
        fwd = rank[i, : k + 1]
        bwd = rank[fwd, : k + 1]
        return fwd[np.where(bwd == i)[0]]

    for i in range(n):
        base = recip(i, k1)
        exp = base
        for c in base:
            cand = recip(c, int(np.around(k1 / 2)))
            if len(np.intersect1d(cand, base)) > 2 / 3 * len(cand):
                exp = np.append(exp, cand)
        exp = np.unique(exp)
        w = np.exp(-d[i, exp])
        v[i, exp] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jac = np.zeros((nq, n))
    for i in range(nq):
        mins = np.minimum(v[i][None, :], v).sum(axis=1)
        jac[i] = 1 - mins / (2 - mins)
    return (jac * (1 - lam) + d[:nq] * lam)[:, nq:]


@pytest.mark.parametrize(
    "seed,nq,ng,k1,k2", [(0, 7, 23, 5, 3), (1, 12, 31, 8, 1), (2, 5, 40, 20, 6)]
)
def test_sparse_chunked_rerank_equals_dense(seed, nq, ng, k1, k2):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(6, 8))
    q = centers[rng.integers(0, 6, nq)] + 0.5 * rng.normal(size=(nq, 8))
    g = centers[rng.integers(0, 6, ng)] + 0.5 * rng.normal(size=(ng, 8))
    expected = dense_rerank(q, g, min(k1, nq + ng - 1), k2, 0.3)
    got = k_reciprocal_rerank(q, g, k1=k1, k2=k2, lambda_value=0.3, chunk=4)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_rerank_helps_on_clustered_data():
    """Queries whose nearest gallery item is a distractor get fixed by their reciprocal set."""
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(10, 16)) * 3
    gid = np.repeat(np.arange(10), 6)
    g = centers[gid] + rng.normal(size=(60, 16))
    qid = np.arange(10)
    q = centers[qid] + 1.6 * rng.normal(size=(10, 16))
    plain = ((q[:, None] - g[None]) ** 2).sum(-1)
    reranked = k_reciprocal_rerank(q, g, k1=6, k2=3)

    def top1(dist):
        return float(np.mean(gid[dist.argmin(axis=1)] == qid))

    assert top1(reranked) >= top1(plain)


def test_average_query_expansion_by_hand():
    q = np.array([[1.0, 0.0]])
    g = np.array([[0.0, 1.0], [1.0, 0.1], [0.9, 0.0]])
    out = average_query_expansion(q, g, k=2)
    expected = q[0] + g[1] / np.linalg.norm(g[1]) + g[2] / np.linalg.norm(g[2])
    np.testing.assert_allclose(out[0], expected / np.linalg.norm(expected))
