"""Center losses of the VI-ReID methods: batch centers per (identity, modality) and three terms.

Notation: batch ``x`` (N, D), identities ``y_i``, modalities ``m_i`` (0 = visible, 1 = infrared).
A *batch center* ``c_y^m`` is the mean of the rows with identity ``y`` and modality ``m``; only
(identity, modality) pairs present in the batch have one. ``P2`` is the number of identities
that have both a visible and an infrared center.

* **Hetero-center triplet** (HcTri, Liu et al. 2020; the center-to-center form that PDM's L_cpm
  and ICRE's ICG build on, methods.md 2.2 and 3.2): batch-hard triplet over the centers, each
  center labelled with its identity,
  ``L_hc = mean_a [ d(c_a, c_a+) - min_{b: y_b != y_a} d(c_a, c_b) + margin ]_+`` with ``c_a+``
  the farthest same-identity center (the other modality's center; the center itself, at
  distance 1e-6, when the identity has one modality in the batch). Same conventions as
  :func:`reid_kernels.triplet_mining_loss` (``margin=None``: softplus; a batch with one
  identity gives 0).
* **Cross-modal center pull** (ICRE's ``(1/P) sum_y |c^v_y - c^r_y|``, the center-to-center
  term of PDM/EMIF): ``L_cm = (1/P2) sum_{y in both} sqrt(max(|c^v_y - c^r_y|^2, 1e-12))``;
  0 when no identity has both modalities.
* **Learnable centers** (Wen et al. 2016) with a center table ``C`` (num_classes, D) passed in:
  ``L_c = (1/N) sum_i |x_i - C_{y_i}|^2 / 2``. The gradient w.r.t. ``C`` is the true gradient
  ``-(1/N) sum_{i: y_i = k} (x_i - C_k)`` (Wen et al.'s alpha-scaled update rule is an optimiser
  choice, e.g. a separate learning rate on ``C``); rows of unused classes get zero gradient.

``total = hetero_weight * L_hc + cross_weight * L_cm + center_weight * L_c``.

Kernels: batch centers are a *sorted segmented reduction*: rows are argsorted (stable) by
segment, one program sums a segment's rows for a block of features (deterministic, no
atomics; bf16 is never accumulated: stack.md section 5 rules out bf16 atomics anyway). The
learnable-center term is one row-wise kernel for the loss and its x-gradient; its table
gradient reuses the segmented reduction over the rows sorted by identity. The triplet over the
(few) centers calls the triplet kernel; the pull works on P2 x D tensors in torch.

Cost: shapes depend on the identities present, so the op syncs with the host three times
(``torch.unique`` and two small ``nonzero``); the kernels themselves are O(N D). On an H200 it
timed at parity with eager torch (about 3-4.5 ms fwd+bwd, host-bound) with 2.3x less peak
memory; removing the syncs needs the number of identities from the caller (a future option).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .dispatch import HAS_TRITON, cdiv, new_buffer, resolve_backend, tl, triton
from .pairwise import EPS, _upcast, blocks_for
from .triplet import triplet_mining_loss

if HAS_TRITON:

    @triton.jit
    def _segment_sum_kernel(
        X,
        PERM,
        OFFS,
        OUT,
        D,
        sxn,
        sxd,
        son,
        sod,
        MEAN: tl.constexpr,
        BD: tl.constexpr,
    ):
        """OUT[s] = sum (or mean) of X[PERM[OFFS[s]:OFFS[s+1]]], one feature block per program."""
        seg = tl.program_id(0)
        pid_d = tl.program_id(1)
        dcols = pid_d * BD + tl.arange(0, BD)
        dmask = dcols < D
        start = tl.load(OFFS + seg)
        end = tl.load(OFFS + seg + 1)
        acc = tl.zeros((BD,), dtype=tl.float32)
        for r in range(start, end):
            row = tl.load(PERM + r).to(tl.int64)
            acc += tl.load(X + row * sxn + dcols * sxd, mask=dmask, other=0.0).to(tl.float32)
        if MEAN:
            acc = acc / tl.maximum(end - start, 1).to(tl.float32)
        tl.store(OUT + seg.to(tl.int64) * son + dcols * sod, acc, mask=dmask)

    @triton.jit
    def _segment_mean_bwd_kernel(
        G, IDX, CNT, DX, N, D, sgn, sgd, sdn, sdd, BM: tl.constexpr, BD: tl.constexpr
    ):
        """DX[i] = G[IDX[i]] / max(CNT[IDX[i]], 1): the backward of a segment mean."""
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < N
        dcols = tl.program_id(1) * BD + tl.arange(0, BD)
        m2 = rmask[:, None] & (dcols < D)[None, :]
        idx = tl.load(IDX + rows, mask=rmask, other=0).to(tl.int64)
        cnt = tl.maximum(tl.load(CNT + idx, mask=rmask, other=1), 1).to(tl.float32)
        g = tl.load(G + idx[:, None] * sgn + dcols[None, :] * sgd, mask=m2, other=0.0)
        tl.store(DX + rows[:, None] * sdn + dcols[None, :] * sdd, g / cnt[:, None], mask=m2)

    @triton.jit
    def _center_dist_kernel(
        X, C, LAB, OUT, N, D, sxn, sxd, scn, scd, BM: tl.constexpr, BK: tl.constexpr
    ):
        """OUT[i] = |x_i - C[lab_i]|^2 / 2."""
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < N
        lab = tl.load(LAB + rows, mask=rmask, other=0).to(tl.int64)
        acc = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            m2 = rmask[:, None] & (ks < D)[None, :]
            xt = tl.load(X + rows[:, None] * sxn + ks[None, :] * sxd, mask=m2, other=0.0).to(
                tl.float32
            )
            ct = tl.load(C + lab[:, None] * scn + ks[None, :] * scd, mask=m2, other=0.0).to(
                tl.float32
            )
            diff = xt - ct
            acc += tl.sum(diff * diff, axis=1)
        tl.store(OUT + rows, 0.5 * acc, mask=rmask)

    @triton.jit
    def _center_dist_bwd_kernel(
        X, C, LAB, GS, DX, N, D, sxn, sxd, scn, scd, sdn, sdd, BM: tl.constexpr, BD: tl.constexpr
    ):
        """DX[i] = GS * (x_i - C[lab_i]); GS is a 1-element tensor (no host sync for grad/N)."""
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < N
        dcols = tl.program_id(1) * BD + tl.arange(0, BD)
        m2 = rmask[:, None] & (dcols < D)[None, :]
        lab = tl.load(LAB + rows, mask=rmask, other=0).to(tl.int64)
        gs = tl.load(GS)
        xt = tl.load(X + rows[:, None] * sxn + dcols[None, :] * sxd, mask=m2, other=0.0).to(
            tl.float32
        )
        ct = tl.load(C + lab[:, None] * scn + dcols[None, :] * scd, mask=m2, other=0.0).to(
            tl.float32
        )
        tl.store(DX + rows[:, None] * sdn + dcols[None, :] * sdd, gs * (xt - ct), mask=m2)


class CenterLosses(NamedTuple):
    """Output of :func:`center_losses`: weighted total, the three unweighted terms, and the
    batch centers they were computed from (fp32; ``batch_centers[k]`` is the mean of identity
    ``center_labels[k]`` in modality ``center_modalities[k]``, sorted by identity then modality).
    """

    total: torch.Tensor
    hetero_triplet: torch.Tensor
    cross_modal: torch.Tensor
    center: torch.Tensor
    batch_centers: torch.Tensor
    center_labels: torch.Tensor
    center_modalities: torch.Tensor


# --------------------------------------------------------------------------------------------
# Segment means
# --------------------------------------------------------------------------------------------
def _sorted_segments(
    segment_ids: torch.Tensor, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm, offsets, counts): rows sorted by segment (stable), CSR offsets, segment sizes."""
    counts = torch.bincount(segment_ids, minlength=num_segments)
    perm = torch.argsort(segment_ids, stable=True).to(torch.int32)
    offsets = torch.zeros(num_segments + 1, dtype=torch.int32, device=segment_ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return perm, offsets, counts


def _launch_segment_sum(
    x: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, num_segments: int, mean: bool
) -> torch.Tensor:
    d = x.shape[1]
    out = new_buffer((num_segments, d), x.device)
    if num_segments == 0 or d == 0:
        return out
    bd = blocks_for(x.device)["BD"]
    _segment_sum_kernel[(num_segments, cdiv(d, bd))](
        x,
        perm,
        offsets,
        out,
        d,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        MEAN=mean,
        BD=bd,
    )
    return out


class _SegmentMean(torch.autograd.Function):
    """Sorted segmented mean; ``perm, offsets, counts`` come from :func:`_sorted_segments`."""

    @staticmethod
    def forward(ctx, x, segment_ids, perm, offsets, counts) -> torch.Tensor:
        ctx.save_for_backward(segment_ids, counts)
        ctx.x_dtype = x.dtype
        return _launch_segment_sum(x, perm, offsets, counts.shape[0], mean=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        seg, counts = ctx.saved_tensors
        grad = grad.float()
        n, d = seg.shape[0], grad.shape[1]
        dx = new_buffer((n, d), grad.device)
        if n and d:
            b = blocks_for(grad.device)
            _segment_mean_bwd_kernel[(cdiv(n, b["BM"]), cdiv(d, b["BD"]))](
                grad, seg, counts, dx, n, d, grad.stride(0), grad.stride(1),
                dx.stride(0), dx.stride(1), BM=b["BM"], BD=b["BD"],
            )  # fmt: skip
        return dx.to(ctx.x_dtype), None, None, None, None


def segment_mean_reference(
    x: torch.Tensor, segment_ids: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """Plain-torch segment means (``index_add_``); empty segments are 0."""
    xf = _upcast(x)
    sums = torch.zeros((num_segments, x.shape[1]), dtype=xf.dtype, device=x.device)
    sums = sums.index_add(0, segment_ids, xf)
    counts = torch.bincount(segment_ids, minlength=num_segments).clamp_min(1).to(xf.dtype)
    return sums / counts[:, None]


def segment_mean(
    x: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, backend: str = "auto"
) -> torch.Tensor:
    """(num_segments, D) means of the rows of ``x`` per ``segment_ids`` value (0 for empty).

    ``segment_ids`` (N,) int64 in ``[0, num_segments)``. fp32 output (float64 for float64
    input on the torch backend); differentiable in ``x``.
    """
    if x.dim() != 2 or segment_ids.shape != (x.shape[0],):
        raise ValueError(
            f"x must be (N, D) and segment_ids (N,), got {tuple(x.shape)} and "
            f"{tuple(segment_ids.shape)}"
        )
    segment_ids = segment_ids.long()
    if resolve_backend(backend, x, segment_ids) == "torch":
        return segment_mean_reference(x, segment_ids, num_segments)
    perm, offsets, counts = _sorted_segments(segment_ids, num_segments)
    return _SegmentMean.apply(x, segment_ids, perm, offsets, counts)


# --------------------------------------------------------------------------------------------
# Learnable centers (Wen et al.)
# --------------------------------------------------------------------------------------------
class _LearnableCenterLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, d = x.shape
        per_row = new_buffer((n,), x.device)
        b = blocks_for(x.device)
        if n:
            _center_dist_kernel[(cdiv(n, b["BM"]),)](
                x,
                table,
                labels,
                per_row,
                n,
                d,
                x.stride(0),
                x.stride(1),
                table.stride(0),
                table.stride(1),
                BM=b["BM"],
                BK=b["BK"],
            )
        ctx.save_for_backward(x, table, labels)
        return per_row.sum() / max(n, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, table, labels = ctx.saved_tensors
        n, d = x.shape
        b = blocks_for(x.device)
        gs = (grad.float() / max(n, 1)).reshape(1)
        dx = dtable = None
        if ctx.needs_input_grad[0]:
            dx = new_buffer((n, d), x.device)
            if n and d:
                _center_dist_bwd_kernel[(cdiv(n, b["BM"]), cdiv(d, b["BD"]))](
                    x,
                    table,
                    labels,
                    gs,
                    dx,
                    n,
                    d,
                    x.stride(0),
                    x.stride(1),
                    table.stride(0),
                    table.stride(1),
                    dx.stride(0),
                    dx.stride(1),
                    BM=b["BM"],
                    BD=b["BD"],
                )
            dx = dx.to(x.dtype)
        if ctx.needs_input_grad[1]:
            # dC_k = -(g/N) (sum_{y_i = k} x_i - n_k C_k): segmented sum over rows sorted by id.
            uniq, inv = torch.unique(labels, return_inverse=True)
            perm, offsets, counts = _sorted_segments(inv, uniq.shape[0])
            sums = _launch_segment_sum(x, perm, offsets, uniq.shape[0], mean=False)
            rows = -gs * (sums - counts.float()[:, None] * table[uniq].float())
            dtable = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
            dtable = dtable.index_copy(0, uniq, rows).to(table.dtype)
        return dx, dtable, None


def learnable_center_loss_reference(
    x: torch.Tensor, table: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``(1/N) sum_i |x_i - C_{y_i}|^2 / 2`` in plain torch."""
    xf = _upcast(x)
    diff = xf - table[labels].to(xf.dtype)
    return 0.5 * (diff * diff).sum(dim=1).sum() / max(x.shape[0], 1)


# --------------------------------------------------------------------------------------------
# The three terms
# --------------------------------------------------------------------------------------------
def _check_inputs(
    x: torch.Tensor, labels: torch.Tensor, modalities: torch.Tensor, table: torch.Tensor | None
) -> None:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-D float tensor, got {tuple(x.shape)} {x.dtype}")
    n = x.shape[0]
    for name, t in (("labels", labels), ("modalities", modalities)):
        if t.shape != (n,) or t.is_floating_point():
            raise ValueError(
                f"{name} must be an integer tensor of shape ({n},), got {tuple(t.shape)} {t.dtype}"
            )
    if n and bool(((modalities != 0) & (modalities != 1)).any()):
        raise ValueError("modalities must be 0 (visible) or 1 (infrared)")
    if table is not None:
        if table.dim() != 2 or table.shape[1] != x.shape[1]:
            raise ValueError(
                f"center_table must be (num_classes, {x.shape[1]}), got {tuple(table.shape)}"
            )
        if n and bool((labels.min() < 0) | (labels.max() >= table.shape[0])):
            raise ValueError(f"labels must index center_table rows [0, {table.shape[0]})")


def _compact_segments(
    labels: torch.Tensor, modalities: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(uniq identities, segment id = 2 * compact identity + modality per row, 2P)."""
    uniq, inv = torch.unique(labels, return_inverse=True)
    return uniq, inv * 2 + modalities.long(), 2 * uniq.shape[0]


def _center_terms(
    centers_all: torch.Tensor,
    uniq: torch.Tensor,
    counts: torch.Tensor,
    margin: float | None,
    backend: str,
):
    """Hetero-center triplet and cross-modal pull from the (2P, D) centers; shared by backends.

    Two host syncs (the sizes of the present centers and of the identities with both
    modalities); everything else stays on the device.
    """
    p = uniq.shape[0]
    present_idx = torch.nonzero(counts > 0).squeeze(1)
    centers = centers_all.index_select(0, present_idx)
    c_labels = uniq.index_select(0, present_idx // 2)
    c_mods = present_idx % 2
    hetero = triplet_mining_loss(centers, c_labels, margin=margin, mode="hard", backend=backend)
    both = torch.nonzero((counts.view(p, 2) > 0).all(dim=1)).squeeze(1)
    if both.numel():
        # Direct difference, not the |a|^2 + |b|^2 - 2ab expansion: P2 x D is tiny, and this is
        # exact when the two centers coincide.
        diff = centers_all.index_select(0, 2 * both) - centers_all.index_select(0, 2 * both + 1)
        cross = (diff * diff).sum(dim=1).clamp_min(EPS).sqrt().mean()
    else:
        cross = centers_all.sum() * 0.0  # keeps the graph (zero gradient)
    return hetero, cross, centers, c_labels, c_mods


def center_losses_reference(
    x: torch.Tensor,
    labels: torch.Tensor,
    modalities: torch.Tensor,
    center_table: torch.Tensor | None = None,
    *,
    margin: float | None = 0.3,
    hetero_weight: float = 1.0,
    cross_weight: float = 1.0,
    center_weight: float = 1.0,
) -> CenterLosses:
    """Plain-torch ground truth of :func:`center_losses` (float64-capable)."""
    _check_inputs(x, labels, modalities, center_table)
    uniq, seg, s = _compact_segments(labels, modalities)
    centers_all = segment_mean_reference(x, seg, s)
    counts = torch.bincount(seg, minlength=s)
    hetero, cross, centers, c_labels, c_mods = _center_terms(
        centers_all, uniq, counts, margin, "torch"
    )
    if center_table is not None:
        center = learnable_center_loss_reference(x, center_table, labels)
    else:
        center = torch.zeros((), dtype=centers_all.dtype, device=x.device)
    total = hetero_weight * hetero + cross_weight * cross + center_weight * center
    return CenterLosses(total, hetero, cross, center, centers, c_labels, c_mods)


def center_losses(
    x: torch.Tensor,
    labels: torch.Tensor,
    modalities: torch.Tensor,
    center_table: torch.Tensor | None = None,
    *,
    margin: float | None = 0.3,
    hetero_weight: float = 1.0,
    cross_weight: float = 1.0,
    center_weight: float = 1.0,
    backend: str = "auto",
) -> CenterLosses:
    """Hetero-center triplet, cross-modal center pull and learnable-center loss of one batch.

    ``x`` (N, D) features (bf16/fp16 upcast to fp32), ``labels`` (N,) int identities,
    ``modalities`` (N,) int, 0 = visible, 1 = infrared; ``center_table`` (num_classes, D)
    learnable centers indexed by ``labels`` (``None``: the term is 0). Formulas in the module
    docstring:

    * ``hetero_triplet = mean_a [d(c_a, c_a+) - min_{y_b != y_a} d(c_a, c_b) + margin]_+``
    * ``cross_modal = mean_{y with both modalities} |c^v_y - c^r_y|``
    * ``center = (1/N) sum_i |x_i - C_{y_i}|^2 / 2``
    * ``total = hetero_weight * hetero_triplet + cross_weight * cross_modal + center_weight * center``

    Differentiable in ``x`` and ``center_table``. Returns a :class:`CenterLosses`.
    """
    _check_inputs(x, labels, modalities, center_table)
    tensors = (x, labels, modalities) + (() if center_table is None else (center_table,))
    be = resolve_backend(backend, *tensors)
    if be == "torch":
        return center_losses_reference(
            x,
            labels,
            modalities,
            center_table,
            margin=margin,
            hetero_weight=hetero_weight,
            cross_weight=cross_weight,
            center_weight=center_weight,
        )
    uniq, seg, s = _compact_segments(labels, modalities)
    perm, offsets, counts = _sorted_segments(seg, s)
    centers_all = _SegmentMean.apply(x, seg, perm, offsets, counts)
    hetero, cross, centers, c_labels, c_mods = _center_terms(centers_all, uniq, counts, margin, be)
    if center_table is not None:
        center = _LearnableCenterLoss.apply(x, center_table, labels.contiguous())
    else:
        center = torch.zeros((), dtype=torch.float32, device=x.device)
    total = hetero_weight * hetero + cross_weight * cross + center_weight * center
    return CenterLosses(total, hetero, cross, center, centers, c_labels, c_mods)


__all__ = [
    "CenterLosses",
    "center_losses",
    "center_losses_reference",
    "learnable_center_loss_reference",
    "segment_mean",
    "segment_mean_reference",
]
