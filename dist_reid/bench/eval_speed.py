"""``dist-reid bench eval``: vectorised :func:`evaluate` against the per-query reference loop.

Both run on the same random distance matrix (cosine distance of L2-normalised features drawn
around one centre per identity, so rankings look like a weak model's rather than pure noise).
The time of the bare row sorts (``np.argsort`` in the chunks :func:`evaluate` uses) is reported
too: both implementations must do them (they fix the tie order), so it is the floor of the
vectorised path.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dist_reid.bench.common import machine_info, markdown_table, write_report
from dist_reid.evaluation.metrics import default_chunk_rows, evaluate, resolve_protocol
from dist_reid.evaluation.reference import reference_evaluate

# Camera sets per protocol, as in the real test splits (protocols.md sections 1-3).
_CAMERAS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "sysu": ((3, 6), (1, 2, 4, 5)),  # IR queries, RGB gallery
    "llcm": ((1, 2, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 5, 6, 7, 8, 9)),  # NIR has no camera 3
    "regdb": ((1,), (2,)),
}


def make_eval_problem(
    num_query: int,
    num_gallery: int,
    num_ids: int,
    protocol: str,
    seed: int = 0,
    feat_dim: int = 256,
    noise: float = 2.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random ``(distmat, query_ids, gallery_ids, query_cams, gallery_cams)``, fixed by ``seed``.

    Every identity appears in the gallery (ids cycled, then shuffled) so nearly all queries are
    valid; distances are ``-(q . g)`` in float32 like the AGW test script.
    """
    if min(num_query, num_gallery, num_ids) < 1:
        raise ValueError("num_query, num_gallery and num_ids must be >= 1")
    rng = np.random.default_rng(seed)
    q_cam_set, g_cam_set = _CAMERAS[resolve_protocol(protocol).name]
    query_ids = rng.integers(0, num_ids, num_query)
    gallery_ids = rng.permutation(np.resize(np.arange(num_ids), num_gallery))
    query_cams = rng.choice(q_cam_set, num_query)
    gallery_cams = rng.choice(g_cam_set, num_gallery)

    centres = rng.standard_normal((num_ids, feat_dim), dtype=np.float32)

    def features(ids: np.ndarray) -> np.ndarray:
        feats = centres[ids] + noise * rng.standard_normal((len(ids), feat_dim), dtype=np.float32)
        return feats / np.linalg.norm(feats, axis=1, keepdims=True)

    distmat = -(features(query_ids) @ features(gallery_ids).T)
    return distmat, query_ids, gallery_ids, query_cams, gallery_cams


def _best_time(fn: Any, repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def run_eval_benchmark(
    num_query: int = 4000,
    num_gallery: int = 10000,
    num_ids: int = 400,
    protocol: str = "sysu",
    repeats: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Time vectorised vs loop evaluation on one matrix; check they agree.

    Returns ``{"machine", "config", "rows", "speedup"}``; ``rows`` hold seconds (best of
    ``repeats``) and the metrics in percent; ``speedup`` = loop seconds / vectorised seconds.
    Raises ``RuntimeError`` if the two implementations disagree.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    name = resolve_protocol(protocol).name
    problem = make_eval_problem(num_query, num_gallery, num_ids, name, seed)
    distmat = problem[0]

    chunk = default_chunk_rows(num_gallery)

    def argsort_only() -> None:
        # The floor of evaluate(): the same row sorts in the same chunks, nothing else.
        for start in range(0, num_query, chunk):
            np.argsort(distmat[start : start + chunk], axis=1)

    t_sort, _ = _best_time(argsort_only, repeats)
    t_vec, fast = _best_time(lambda: evaluate(*problem, protocol=name), repeats)
    t_loop, (cmc, m_ap, m_inp) = _best_time(
        lambda: reference_evaluate(*problem, protocol=name), repeats
    )

    # cmc must be bit-identical; mAP sums in another order (ulp-level), mINP in the same order.
    agree = bool(
        np.array_equal(fast.cmc, cmc)
        and abs(fast.mAP - m_ap) <= 1e-9
        and abs(fast.mINP - m_inp) <= 1e-12
    )
    if not agree:
        raise RuntimeError(
            f"vectorised and reference evaluation disagree: cmc {fast.cmc[:5]} vs {cmc[:5]}, "
            f"mAP {fast.mAP!r} vs {m_ap!r}, mINP {fast.mINP!r} vs {m_inp!r}"
        )
    metrics = fast.as_dict()
    rows = [
        {"impl": "vectorised evaluate()", "seconds": t_vec, **metrics},
        {"impl": "reference loop", "seconds": t_loop, **metrics},
        {"impl": "np.argsort only, same chunks (floor)", "seconds": t_sort},
    ]
    return {
        "machine": machine_info(),
        "config": {
            "num_query": num_query,
            "num_gallery": num_gallery,
            "num_ids": num_ids,
            "protocol": name,
            "repeats": repeats,
            "seed": seed,
            "distmat_dtype": str(distmat.dtype),
            "num_valid": fast.num_valid,
            "agree": agree,
        },
        "rows": rows,
        "speedup": t_loop / t_vec,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run the benchmark, write ``eval_speed_<protocol>_<Q>x<G>.{json,md}``, print the table."""
    parser = argparse.ArgumentParser(
        prog="dist-reid bench eval", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--num-query", type=int, default=4000)
    parser.add_argument("--num-gallery", type=int, default=10000)
    parser.add_argument("--num-ids", type=int, default=400)
    parser.add_argument("--protocol", choices=("sysu", "llcm", "regdb"), default="sysu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench", help="report folder (default: runs/bench)")
    args = parser.parse_args(argv)

    payload = run_eval_benchmark(
        num_query=args.num_query,
        num_gallery=args.num_gallery,
        num_ids=args.num_ids,
        protocol=args.protocol,
        repeats=args.repeats,
        seed=args.seed,
    )
    name = f"eval_speed_{args.protocol}_{args.num_query}x{args.num_gallery}"
    json_path, md_path = write_report(name, payload, args.out)
    print(markdown_table(payload["rows"]), end="")
    print(f"speedup (loop / vectorised): {payload['speedup']:.1f}x")
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
