"""Pairwise Euclidean distances, ``D_ij = sqrt(max(||x_i||^2 + ||y_j||^2 - 2 x_i.y_j, eps))``.

Layout (architecture decision 6): Triton kernels, the autograd Function, the torch reference and
the public dispatchers :func:`pairwise_distance` and :func:`topk_distances`.

Numerics shared by every op of the package (they all reuse :func:`_sq_dist_tile`):

* The squared distance is clamped at ``EPS = 1e-12`` before the square root, like fast-reid and
  torchreid (and unlike ``torch.cdist``, whose gradient at zero distance used to be NaN). The
  clamp's gradient passes where ``s >= EPS`` and is zero below, as ``torch.clamp_min``.
* When ``y`` is omitted (distances of a set to itself) the diagonal is set to exactly 0 before the
  clamp, so ``D_ii = sqrt(EPS) = 1e-6`` with zero gradient. The expansion ``|x|^2 + |x|^2 - 2 x.x``
  would otherwise leave rounding noise of order ``eps_fp32 * |x|^2`` there (TF32 made it worse on
  Ampere, anchors.md C.4). Duplicated *distinct* rows keep that noise: it is inherent to the
  expansion and bounded by about ``sqrt(8 eps |x|^2)``.
* Tiles are loaded in the input dtype and upcast to fp32 right after the load (the Triton
  interpreter computes half arithmetic wrongly; stack.md section 5). On a GPU, half inputs go to
  ``tl.dot`` natively (exact products, fp32 accumulation); fp32 inputs use full-precision ``ieee``
  dots, never TF32. Outputs are fp32.
"""

from __future__ import annotations

import torch

from .dispatch import (
    HAS_TRITON,
    cdiv,
    dot_config,
    new_buffer,
    resolve_backend,
    tl,
    triton,
)

EPS = 1e-12

# Tile sizes. tl.dot needs every dimension >= 16.
# * BM x BN: output tile of the 2-D distance kernel (plenty of programs at any size).
# * BR: rows per program of the row-streaming kernels (triplet forward, every backward); they
#   launch cdiv(N, BR) (x cdiv(D, BD)) programs, so BR trades parallelism against MMA shape.
# * BK: feature step of the distance recompute (128 bytes of a row per load on a GPU).
# * BD: feature block of a backward program (each costs one recompute of its s tiles).
# * WF / WB: warps of the forward / backward kernels (backward holds a BR x BD accumulator).
# Under the interpreter every program instance is a Python loop iteration, so tiles there are
# as large as the tests' awkward shapes allow while still spanning several blocks.
# GPU values: the fastest of a small sweep on an H200 (bf16; N in {256, 1024}, D in {512, 2048};
# (BR, BD, WB) in (16|32|64, 64|128|256, 4|8), not every combination). At N = 1024, D = 2048
# BR = 64 (backward dots with M = 64, Hopper's warpgroup MMA) ran pairwise fwd+bwd in 0.99 ms
# against 2.0-5.0 ms for BR = 16/32; at N = 256 the configurations were within 15%. 64 x 64
# forward tiles tied with 128-wide ones.
_GPU_BLOCKS = {"BM": 64, "BN": 64, "BK": 32, "BR": 64, "BD": 128, "WF": 4, "WB": 8}
_CPU_BLOCKS = {"BM": 32, "BN": 32, "BK": 16, "BR": 32, "BD": 32, "WF": 4, "WB": 4}


def blocks_for(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Tile sizes used on ``device`` for inputs of ``dtype`` (a copy, safe to modify)."""
    if device.type != "cuda":
        return dict(_CPU_BLOCKS)
    b = dict(_GPU_BLOCKS)
    if dtype in (torch.float16, torch.bfloat16):
        b["BK"] *= 2  # same 128 bytes per row load
    return b


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Loss math in fp32 (architecture decision 7); float64 stays float64 for ground truth."""
    return t if t.dtype == torch.float64 else t.float()


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _sq_dist_tile(
        X,
        Y,
        rows,
        cols,
        rmask,
        cmask,
        D,
        sxn,
        sxd,
        syn,
        syd,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        DOT_NATIVE: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """(BM, BN) tile of unclamped squared distances between rows of X and rows of Y."""
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        xn = tl.zeros((BM,), dtype=tl.float32)
        yn = tl.zeros((BN,), dtype=tl.float32)
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < D
            xt = tl.load(
                X + rows[:, None] * sxn + ks[None, :] * sxd,
                mask=rmask[:, None] & kmask[None, :],
                other=0.0,
            )
            yt = tl.load(
                Y + cols[:, None] * syn + ks[None, :] * syd,
                mask=cmask[:, None] & kmask[None, :],
                other=0.0,
            )
            xf = xt.to(tl.float32)  # upcast right after the load (interpreter + fp32 math)
            yf = yt.to(tl.float32)
            xn += tl.sum(xf * xf, axis=1)
            yn += tl.sum(yf * yf, axis=1)
            if DOT_NATIVE:
                acc = tl.dot(xt, tl.trans(yt), acc)
            else:
                acc = tl.dot(xf, tl.trans(yf), acc, input_precision=PREC)
        return xn[:, None] + yn[None, :] - 2.0 * acc

    @triton.jit
    def _pdist_fwd_kernel(
        X,
        Y,
        OUT,
        N,
        M,
        D,
        sxn,
        sxd,
        syn,
        syd,
        son,
        som,
        EPS_: tl.constexpr,
        SQUARED: tl.constexpr,
        SAME: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        DOT_NATIVE: tl.constexpr,
        PREC: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        cols = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
        rmask = rows < N
        cmask = cols < M
        s = _sq_dist_tile(
            X, Y, rows, cols, rmask, cmask, D, sxn, sxd, syn, syd, BM, BN, BK, DOT_NATIVE, PREC
        )
        if SAME:
            s = tl.where(rows[:, None] == cols[None, :], 0.0, s)
        s = tl.maximum(s, EPS_)
        if not SQUARED:
            s = tl.sqrt(s)
        tl.store(
            OUT + rows[:, None] * son + cols[None, :] * som, s, mask=rmask[:, None] & cmask[None, :]
        )

    @triton.jit
    def _pdist_bwd_kernel(
        X,
        Y,
        G,
        DX,
        N,
        M,
        D,
        sxn,
        sxd,
        syn,
        syd,
        sgn,
        sgm,
        sdn,
        sdd,
        EPS_: tl.constexpr,
        SQUARED: tl.constexpr,
        SAME: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        BD: tl.constexpr,
        DOT_NATIVE: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """dX = 2 (rowsum(A) * X - A @ Y) with A = G * dD/ds, recomputing s tile by tile.

        One program owns a (BM rows, BD features) block of dX and streams over all of Y, so
        nothing of size N x M is read except G itself and nothing is written but dX. The s tile
        is recomputed once per feature block (cost D/BD forward GEMMs): the price of keeping
        backward free of atomics and of any saved N x M state. With SAME (y is x), A + A^T is
        formed from G and G^T so one launch gives the whole gradient.
        """
        pid_m = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < N
        dcols = pid_d * BD + tl.arange(0, BD)
        dmask = dcols < D
        acc = tl.zeros((BM, BD), dtype=tl.float32)
        rs = tl.zeros((BM,), dtype=tl.float32)
        for n0 in range(0, M, BN):
            cols = (n0 + tl.arange(0, BN)).to(tl.int64)
            cmask = cols < M
            m2 = rmask[:, None] & cmask[None, :]
            s = _sq_dist_tile(
                X, Y, rows, cols, rmask, cmask, D, sxn, sxd, syn, syd, BM, BN, BK, DOT_NATIVE, PREC
            )
            active = m2 & (s >= EPS_)
            if SAME:
                active = active & (rows[:, None] != cols[None, :])
            g = tl.load(G + rows[:, None] * sgn + cols[None, :] * sgm, mask=m2, other=0.0).to(
                tl.float32
            )
            if SAME:
                g += tl.load(G + cols[None, :] * sgn + rows[:, None] * sgm, mask=m2, other=0.0).to(
                    tl.float32
                )
            a = g
            if not SQUARED:
                a = a * 0.5 / tl.sqrt(tl.maximum(s, EPS_))
            a = tl.where(active, a, 0.0)
            rs += tl.sum(a, axis=1)
            yt = tl.load(
                Y + cols[:, None] * syn + dcols[None, :] * syd,
                mask=cmask[:, None] & dmask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc = tl.dot(a, yt, acc, input_precision=PREC)
        xt = tl.load(
            X + rows[:, None] * sxn + dcols[None, :] * sxd,
            mask=rmask[:, None] & dmask[None, :],
            other=0.0,
        ).to(tl.float32)
        dx = 2.0 * (rs[:, None] * xt - acc)
        tl.store(
            DX + rows[:, None] * sdn + dcols[None, :] * sdd,
            dx,
            mask=rmask[:, None] & dmask[None, :],
        )


def _launch_fwd(
    x: torch.Tensor, y: torch.Tensor, squared: bool, same: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Run the forward kernel; ``out`` (any strides, fp32) may be given to reuse a buffer."""
    n, d = x.shape
    m = y.shape[0]
    if out is None:
        out = new_buffer((n, m), x.device)
    if n == 0 or m == 0:
        return out
    b = blocks_for(x.device, x.dtype)
    native, prec = dot_config(x.dtype, x.device)
    grid = (cdiv(n, b["BM"]), cdiv(m, b["BN"]))
    _pdist_fwd_kernel[grid](
        x,
        y,
        out,
        n,
        m,
        d,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        out.stride(0),
        out.stride(1),
        EPS,
        SQUARED=squared,
        SAME=same,
        BM=b["BM"],
        BN=b["BN"],
        BK=b["BK"],
        DOT_NATIVE=native,
        PREC=prec,
        num_warps=b["WF"],
    )
    return out


def _launch_bwd(
    x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, squared: bool, same: bool
) -> torch.Tensor:
    """Gradient w.r.t. ``x`` of ``sum(g * D(x, y))`` (fp32); with ``same`` both slots of D."""
    n, d = x.shape
    m = y.shape[0]
    dx = new_buffer((n, d), x.device)
    if n == 0 or d == 0:
        return dx
    b = blocks_for(x.device, x.dtype)
    native, prec = dot_config(x.dtype, x.device)
    grid = (cdiv(n, b["BR"]), cdiv(d, b["BD"]))
    _pdist_bwd_kernel[grid](
        x,
        y,
        g,
        dx,
        n,
        m,
        d,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        g.stride(0),
        g.stride(1),
        dx.stride(0),
        dx.stride(1),
        EPS,
        SQUARED=squared,
        SAME=same,
        BM=b["BR"],
        BN=b["BN"],
        BK=b["BK"],
        BD=b["BD"],
        DOT_NATIVE=native,
        PREC=prec,
        num_warps=b["WB"],
    )
    return dx


class _PairwiseDistance(torch.autograd.Function):
    """Saves only the inputs; backward recomputes the distance tiles (no N x M saved state)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor | None, squared: bool) -> torch.Tensor:
        same = y is None
        yy = x if same else y
        ctx.squared, ctx.same = squared, same
        ctx.save_for_backward(x, yy)
        return _launch_fwd(x, yy, squared, same)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y = ctx.saved_tensors
        grad = grad.float()
        dx = dy = None
        if ctx.needs_input_grad[0]:
            dx = _launch_bwd(x, y, grad, ctx.squared, ctx.same).to(x.dtype)
        if not ctx.same and ctx.needs_input_grad[1]:
            dy = _launch_bwd(y, x, grad.t(), ctx.squared, False).to(y.dtype)
        return dx, dy, None


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def pairwise_distance_reference(
    x: torch.Tensor, y: torch.Tensor | None = None, squared: bool = False
) -> torch.Tensor:
    """Plain-torch ground truth (float64 stays float64, other dtypes compute in fp32)."""
    same = y is None
    xf = _upcast(x)
    yf = xf if same else _upcast(y)
    s = (xf * xf).sum(1)[:, None] + (yf * yf).sum(1)[None, :] - 2.0 * (xf @ yf.t())
    if same:
        eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
        s = torch.where(eye, torch.zeros((), dtype=s.dtype, device=s.device), s)
    s = s.clamp_min(EPS)
    return s if squared else s.sqrt()


def _check_features(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def pairwise_distance(
    x: torch.Tensor, y: torch.Tensor | None = None, squared: bool = False, backend: str = "auto"
) -> torch.Tensor:
    """(N, M) fp32 distances ``sqrt(max(|x_i|^2 + |y_j|^2 - 2 x_i.y_j, 1e-12))`` (or the clamped
    square with ``squared=True``); ``y=None`` means ``y = x`` with an exact-zero diagonal.

    Differentiable in ``x`` and ``y``; the Triton backward recomputes tiles instead of saving
    the matrix. float64 inputs give a float64 result on the torch backend.
    """
    _check_features("x", x)
    if y is not None:
        _check_features("y", y)
        if y.shape[1] != x.shape[1]:
            raise ValueError(f"feature widths differ: x {tuple(x.shape)} vs y {tuple(y.shape)}")
    tensors = (x,) if y is None else (x, y)
    if resolve_backend(backend, *tensors) == "torch":
        return pairwise_distance_reference(x, y, squared)
    return _PairwiseDistance.apply(x, y, squared)


def _topk_chunk_cols(num_query: int, num_gallery: int, k: int, budget_bytes: int) -> int:
    cols = max(budget_bytes // max(4 * num_query, 1), 1024)
    cols = max(cols, 2 * k)  # each merge must see at least k new candidates to stay cheap
    return min(cols, num_gallery)


def topk_distances(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    squared: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    budget_bytes: int = 256 * 2**20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest distances of each query to the gallery, streamed over gallery chunks.

    Returns ``(values, indices)``, both (Nq, k), sorted by increasing distance; ``values`` are
    fp32 (float64 for float64 inputs on the torch backend), ``indices`` int64 gallery rows.
    Memory is one (Nq, chunk) block (``chunk_size`` columns, by default as many as fit in
    ``budget_bytes``) plus the running (Nq, 2k) merge, never the full (Nq, Ng) matrix. Each
    chunk is a distance block (the Triton forward kernel, or the reference), reduced with
    ``torch.topk`` and merged into the running top-k. Forward only. Which of several equal
    distances at the k-th place is kept is unspecified, as in ``torch.topk``.
    """
    _check_features("query", query)
    _check_features("gallery", gallery)
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"feature widths differ: {tuple(query.shape)} vs {tuple(gallery.shape)}")
    nq, ng = query.shape[0], gallery.shape[0]
    if not 0 < k <= ng:
        raise ValueError(f"k must be in [1, {ng}] (gallery size), got {k}")
    use_triton = resolve_backend(backend, query, gallery) == "triton"
    cols = chunk_size or _topk_chunk_cols(nq, ng, k, budget_bytes)
    out_dtype = torch.float32 if use_triton else _upcast(query).dtype
    with torch.no_grad():
        buf = new_buffer((nq, cols), query.device) if use_triton else None
        best_v = torch.empty((nq, 0), dtype=out_dtype, device=query.device)
        best_i = torch.empty((nq, 0), dtype=torch.int64, device=query.device)
        for g0 in range(0, ng, cols):
            g = gallery[g0 : g0 + cols]
            if use_triton:
                dist = _launch_fwd(query, g, squared, False, out=buf[:, : g.shape[0]])
            else:
                dist = pairwise_distance_reference(query, g, squared)
            kk = min(k, g.shape[0])
            v, i = torch.topk(dist, kk, dim=1, largest=False, sorted=False)
            cand_v = torch.cat([best_v, v], dim=1)
            cand_i = torch.cat([best_i, i + g0], dim=1)
            kk = min(k, cand_v.shape[1])
            best_v, pos = torch.topk(cand_v, kk, dim=1, largest=False, sorted=False)
            best_i = torch.gather(cand_i, 1, pos)
        # Final order: by distance, ties by gallery index (stable sort after an index sort).
        order = torch.argsort(best_i, dim=1)
        best_v, best_i = best_v.gather(1, order), best_i.gather(1, order)
        order = torch.argsort(best_v, dim=1, stable=True)
        return best_v.gather(1, order), best_i.gather(1, order)


__all__ = [
    "EPS",
    "blocks_for",
    "pairwise_distance",
    "pairwise_distance_reference",
    "topk_distances",
]
