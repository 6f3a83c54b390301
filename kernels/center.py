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

Cost: with arbitrary labels, shapes depend on the identities present, so the op syncs with the
host (``torch.unique``, two small ``nonzero`` and the input checks); the kernels themselves are
O(N D). On an H200 that path timed at parity with eager torch (about 3-4.5 ms fwd+bwd,
host-bound) with 2.3x less peak memory. The sampler's batches have a fixed layout (P identities
x K visible + K infrared, see :class:`BatchLayout`): given it, every index is arange arithmetic
on the device, every segment is known to be full, and the op runs without a host sync.
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


class BatchLayout(NamedTuple):
    """The sampler's local batch (``ModalityBalancedSampler``, ``IdentityModalitySampler``):
    ``identities`` (P) distinct identities x ``instances`` (K) rows of one modality, then the same
    identities in the same order x K rows of the other modality; an identity's K rows are
    contiguous in each half. ``infrared_first``: the infrared half comes first (MIP's sampler).
    """

    identities: int
    instances: int
    infrared_first: bool = False

    @property
    def rows(self) -> int:
        return 2 * self.identities * self.instances


class _LayoutSegments(NamedTuple):
    """Index tensors of a :class:`BatchLayout` batch with identities in ascending order.

    ``uniq`` (P,) sorted identities, ``order`` (P,) the slot of each; ``seg`` (N,) segment of each row, ``2 * rank(identity) +
    modality``; ``perm``/``offsets``: the rows of each of the 2P segments (CSR, K each);
    ``id_perm``/``id_offsets``: the rows of each identity (2K each, for the table gradient).
    """

    uniq: torch.Tensor
    order: torch.Tensor
    seg: torch.Tensor
    perm: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    id_perm: torch.Tensor
    id_offsets: torch.Tensor
    id_counts: torch.Tensor


def _layout_ranks(
    labels: torch.Tensor, layout: BatchLayout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted identities, slot of each, rank of each slot's identity): one sort of P labels."""
    p, k = layout.identities, layout.instances
    if labels.shape != (layout.rows,):
        raise ValueError(
            f"layout {tuple(layout)} has {layout.rows} rows, labels {tuple(labels.shape)}"
        )
    uniq, order = torch.sort(labels[: p * k : k], stable=True)  # both halves share slot order
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(p, device=labels.device))
    return uniq, order, rank


def _layout_segments(labels: torch.Tensor, layout: BatchLayout) -> _LayoutSegments:
    """Arange arithmetic and one sort of P labels, all on the device: no host sync."""
    p, k, first = layout.identities, layout.instances, int(layout.infrared_first)
    dev = labels.device
    uniq, order, rank = _layout_ranks(labels, layout)
    rows = torch.arange(2 * p * k, device=dev)
    half = rows // (p * k)
    seg = 2 * rank[(rows % (p * k)) // k] + (half ^ first)
    s = torch.arange(2 * p, device=dev)
    slot, modality = order[s // 2], s % 2
    starts = (modality ^ first) * (p * k) + slot * k
    within = torch.arange(k, device=dev)
    perm = (starts[:, None] + within[None, :]).reshape(-1).to(torch.int32)
    offsets = (torch.arange(2 * p + 1, device=dev) * k).to(torch.int32)
    counts = torch.full((2 * p,), k, dtype=torch.long, device=dev)
    id_perm = perm.view(p, 2 * k).reshape(-1)  # an identity's two segments are adjacent
    id_offsets = (torch.arange(p + 1, device=dev) * 2 * k).to(torch.int32)
    id_counts = torch.full((p,), 2 * k, dtype=torch.long, device=dev)
    return _LayoutSegments(uniq, order, seg, perm, offsets, counts, id_perm, id_offsets, id_counts)


def batch_identities(
    labels: torch.Tensor, layout: BatchLayout | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct identities, each row's index into them): ``torch.unique(labels,
    return_inverse=True)``, which syncs with the host; for a :class:`BatchLayout` batch the
    same two tensors from the layout, without a sync."""
    if layout is None:
        return torch.unique(labels, return_inverse=True)
    uniq, _, rank = _layout_ranks(labels, layout)
    slot = (
        torch.arange(layout.rows, device=labels.device) % (layout.rows // 2)
    ) // layout.instances
    return uniq, rank[slot]


def check_layout(labels: torch.Tensor, modalities: torch.Tensor, layout: BatchLayout) -> None:
    """Raise ``ValueError`` unless the batch has ``layout`` (distinct identities, each with K
    rows per modality in the layout's places). It reads the values, so it syncs with the host:
    call it once (e.g. on the first batch), not every step."""
    p, k = layout.identities, layout.instances
    if p < 1 or k < 1:
        raise ValueError(f"layout needs identities and instances >= 1, got {tuple(layout)}")
    if labels.shape != (layout.rows,) or modalities.shape != (layout.rows,):
        raise ValueError(
            f"layout {p} identities x 2 x {k} instances has {layout.rows} rows, got labels "
            f"{tuple(labels.shape)} and modalities {tuple(modalities.shape)}"
        )
    lab = labels.view(2, p, k)
    mods = modalities.long().view(2, p, k)
    first = int(layout.infrared_first)
    if not (bool((mods[0] == first).all()) and bool((mods[1] == 1 - first).all())):
        raise ValueError(
            f"modalities do not follow the layout (the {'infrared' if first else 'visible'} "
            "half first, then the other)"
        )
    if not bool((lab == lab[0, :, :1]).all()):
        raise ValueError(
            "labels do not follow the layout (each identity's K rows contiguous, the same "
            "identity order in both halves)"
        )
    if torch.unique(lab[0, :, 0]).numel() != p:
        raise ValueError("labels do not follow the layout (an identity appears in two slots)")


# --------------------------------------------------------------------------------------------
# Segment means
# --------------------------------------------------------------------------------------------
def _segment_counts(segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Rows per segment (int64); ids outside ``[0, num_segments)`` are an index error."""
    counts = torch.zeros(num_segments, dtype=torch.long, device=segment_ids.device)
    return counts.index_add_(0, segment_ids, torch.ones_like(segment_ids))


def _sorted_segments(
    segment_ids: torch.Tensor, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm, offsets, counts): rows sorted by segment (stable), CSR offsets, segment sizes.

    Counts by ``index_add`` into ``num_segments`` slots, not ``bincount`` (which reads the
    maximum on the host); nothing here syncs."""
    counts = _segment_counts(segment_ids, num_segments)
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
    counts = _segment_counts(segment_ids, num_segments).clamp_min(1).to(xf.dtype)
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
    def forward(
        ctx,
        x: torch.Tensor,
        table: torch.Tensor,
        labels: torch.Tensor,
        id_segments: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """``id_segments``: (identities, perm, offsets, counts) of the rows per identity when
        the caller knows them (a :class:`BatchLayout`); else the backward finds them."""
        ctx.id_segments = id_segments
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
            if ctx.id_segments is not None:
                uniq, perm, offsets, counts = ctx.id_segments
            else:
                uniq, inv = torch.unique(labels, return_inverse=True)
                perm, offsets, counts = _sorted_segments(inv, uniq.shape[0])
            sums = _launch_segment_sum(x, perm, offsets, uniq.shape[0], mean=False)
            rows = -gs * (sums - counts.float()[:, None] * table[uniq].float())
            dtable = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
            dtable = dtable.index_copy(0, uniq, rows).to(table.dtype)
        return dx, dtable, None, None


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
    x: torch.Tensor,
    labels: torch.Tensor,
    modalities: torch.Tensor,
    table: torch.Tensor | None,
    values: bool = True,
) -> None:
    """Shapes and dtypes always; ``values`` (modalities in {0, 1}, labels inside the table)
    reads the tensors, a host sync, so the layout path leaves it to :func:`check_layout`."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-D float tensor, got {tuple(x.shape)} {x.dtype}")
    n = x.shape[0]
    for name, t in (("labels", labels), ("modalities", modalities)):
        if t.shape != (n,) or t.is_floating_point():
            raise ValueError(
                f"{name} must be an integer tensor of shape ({n},), got {tuple(t.shape)} {t.dtype}"
            )
    if values and n and bool(((modalities != 0) & (modalities != 1)).any()):
        raise ValueError("modalities must be 0 (visible) or 1 (infrared)")
    if table is not None:
        if table.dim() != 2 or table.shape[1] != x.shape[1]:
            raise ValueError(
                f"center_table must be (num_classes, {x.shape[1]}), got {tuple(table.shape)}"
            )
        if values and n and bool((labels.min() < 0) | (labels.max() >= table.shape[0])):
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
    complete: bool = False,
):
    """Hetero-center triplet and cross-modal pull from the (2P, D) centers; shared by backends.

    With arbitrary labels, two host syncs (the sizes of the present centers and of the
    identities with both modalities). ``complete``: every identity has both centers (a
    :class:`BatchLayout` batch), so neither size depends on the data and nothing syncs.
    """
    p = uniq.shape[0]
    if complete:
        c_labels = uniq[:, None].expand(p, 2).reshape(-1)
        c_mods = torch.arange(2 * p, device=centers_all.device) % 2
        hetero = triplet_mining_loss(
            centers_all, c_labels, margin=margin, mode="hard", backend=backend
        )
        diff = centers_all[0::2] - centers_all[1::2]
        cross = (diff * diff).sum(dim=1).clamp_min(EPS).sqrt().mean()
        return hetero, cross, centers_all, c_labels, c_mods
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
    layout: BatchLayout | None = None,
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

    ``layout``: the batch is a :class:`BatchLayout` (the sampler's); the same values, computed
    without host syncs (values are not checked: call :func:`check_layout` once). ``None``:
    arbitrary labels.

    Differentiable in ``x`` and ``center_table``. Returns a :class:`CenterLosses`.
    """
    _check_inputs(x, labels, modalities, center_table, values=layout is None)
    tensors = (x, labels, modalities) + (() if center_table is None else (center_table,))
    be = resolve_backend(backend, *tensors)
    weights = (hetero_weight, cross_weight, center_weight)
    if layout is not None:
        if x.shape[0] != layout.rows:
            raise ValueError(f"layout {tuple(layout)} has {layout.rows} rows, x has {x.shape[0]}")
        return _center_losses_layout(x, labels, center_table, layout, margin, weights, be)
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


def _center_losses_layout(
    x: torch.Tensor,
    labels: torch.Tensor,
    table: torch.Tensor | None,
    layout: BatchLayout,
    margin: float | None,
    weights: tuple[float, float, float],
    backend: str,
) -> CenterLosses:
    """:func:`center_losses` of a :class:`BatchLayout` batch: static shapes, no host sync."""
    segs = _layout_segments(labels, layout)
    p, k = layout.identities, layout.instances
    if backend == "torch":
        halves = _upcast(x).view(2, p, k, x.shape[1]).mean(dim=2)  # (half, slot, D)
        if layout.infrared_first:
            halves = halves.flip(0)  # (modality, slot, D)
        centers_all = halves.transpose(0, 1).index_select(0, segs.order).reshape(2 * p, -1)
    else:
        centers_all = _SegmentMean.apply(x, segs.seg, segs.perm, segs.offsets, segs.counts)
    hetero, cross, centers, c_labels, c_mods = _center_terms(
        centers_all, segs.uniq, segs.counts, margin, backend, complete=True
    )
    if table is None:
        center = torch.zeros((), dtype=centers_all.dtype, device=x.device)
    elif backend == "torch":
        center = learnable_center_loss_reference(x, table, labels)
    else:
        id_segments = (segs.uniq, segs.id_perm, segs.id_offsets, segs.id_counts)
        center = _LearnableCenterLoss.apply(x, table, labels.contiguous(), id_segments)
    total = weights[0] * hetero + weights[1] * cross + weights[2] * center
    return CenterLosses(total, hetero, cross, center, centers, c_labels, c_mods)


__all__ = [
    "BatchLayout",
    "CenterLosses",
    "batch_identities",
    "center_losses",
    "center_losses_reference",
    "check_layout",
    "learnable_center_loss_reference",
    "segment_mean",
    "segment_mean_reference",
]
