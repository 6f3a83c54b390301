"""Triplet losses with in-batch mining: batch-hard and AGW's weighted regularisation (WRT).

For anchor ``i`` of a batch ``x`` (N, D) with integer ``labels``, distances are those of
:func:`reid_kernels.pairwise_distance` with ``y = x`` (so ``d_ii = 1e-6`` exactly, zero gradient).
Positives ``P(i)`` are the rows with the anchor's label, **self included** (as in fast-reid,
torchreid and AGW's code); negatives ``N(i)`` are the rows with another label.

* ``mode="hard"``: ``d_ap = max_{j in P(i)} d_ij``, ``d_an = min_{j in N(i)} d_ij``; equal
  distances pick the lowest column index.
* ``mode="weighted"`` (AGW WRT): ``d_ap = sum_{P(i)} w_j d_ij`` and ``d_an = sum_{N(i)} v_j d_ij``
  with softmax weights over the anchor's positives (of ``d``) and negatives (of ``-d``),
  differentiated through. ``wrt_form`` picks the weights:

  - ``"exact"``: the exact softmaxes ``w = softmax_P(d)``, ``v = softmax_N(-d)``.
  - ``"official"``: the weights of AGW's released ``TripletLoss_WRT``. Its softmax subtracts the
    row maximum of the *masked* logits, where masked-out entries count as 0, and adds
    ``WRT_EPS = 1e-6`` to the denominator: ``w_j = e^(d_j - m) / (sum_P e^(d - m) + 1e-6)``
    with ``m = max_P d`` (distances are positive, so the max is a positive's), and
    ``v_j = e^(-d_j) / (sum_N e^(-d) + 1e-6)`` (every negative logit is below the masked 0, so
    the shift is 0). Once the nearest negatives are ~20 or more apart, ``sum_N e^(-d)`` falls
    below 1e-6, ``d_an`` collapses towards 0 and the loss becomes ~ ``softplus(d_ap)``: a
    different training signal from the exact form (gradient cosine ~ 0.4 at mean distance
    25-30). The max is differentiated through too (it picks the lowest index on ties), which
    adds ``-d_ap 1e-6 / (sum_P e^(d - m) + 1e-6)`` to ``dd_ap/dd`` at the farthest positive.
    Anchors without a negative get ``d_an = 0`` and count in the mean, as in that code.

Per anchor, ``l_i = max(d_ap - d_an + margin, 0)``, or ``softplus(d_ap - d_an) =
log(1 + exp(d_ap - d_an))`` when ``margin is None`` (soft margin). In weighted mode a numeric
margin gives the same hinge on the weighted distances, ``[d_ap - d_an + margin]_+``; AGW's WRT
is ``mode="weighted", margin=None``.

Degenerate anchors, handled the same way by every backend:

* no negative (only one identity in the batch, or N = 1): the anchor has no triplet and is
  **excluded from the mean** (except with ``wrt_form="official"``, see above); if no anchor
  has a negative the loss is exactly 0 (with zero gradient). fast-reid reaches the same value
  another way (``d_an = 1e9``, so hinge and softplus both give 0, but such anchors still count
  in its denominator), torchreid's ``TripletLoss`` raises on the empty ``min``, and AGW's WRT
  sets ``d_an = 0`` and so adds ``softplus(d_ap)``.
* no positive other than itself: the anchor keeps ``d_ap = d_ii = 1e-6`` (the clamp floor) and
  counts, exactly as in the community code whose masks include the diagonal.

The loss is ``sum_i valid_i l_i / max(1, sum_i valid_i)``.

Kernels: one forward program per block of anchors streams over column blocks, recomputing
the distance tile (tiled ``tl.dot`` over the features), building the label masks and carrying
the row reductions (running max/argmax and min/argmin, or an online softmax in the style of
flash attention); it also writes each anchor's loss, validity and ``dloss/dz``, so the host
only sums two rows. Only O(N) row statistics are saved (no N x N matrix). The hard-mode
backward is sparse (each anchor touches three rows): one kernel scatters with fp32 atomics,
or, under ``torch.use_deterministic_algorithms(True)``, a torch ``index_add_`` path that is
deterministic. The weighted backward re-streams the tiles in a fused kernel (see
``_wrt_bwd_kernel``), deterministic by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import HAS_TRITON, cdiv, dot_config, new_buffer, resolve_backend, tl, triton
from .pairwise import EPS, blocks_for, pairwise_distance_reference

MODES = ("hard", "weighted")
WRT_FORMS = ("exact", "official")
# The released WRT's softmax denominator term (see the module docstring), and its log.
WRT_EPS = 1e-6
_LOG_WRT_EPS = -13.815510557964274

if HAS_TRITON:
    from .pairwise import _sq_dist_tile

    @triton.jit
    def _triplet_fwd_kernel(
        X,
        LAB,
        S_AP,
        S_AN,
        I_AP,
        I_AN,
        D_AP,
        D_AN,
        LSE_P,
        LSE_N,
        K_AP,
        OUT,
        N,
        D,
        sxn,
        sxd,
        MARGIN,
        EPS_: tl.constexpr,
        WRT_EPS_: tl.constexpr,
        LOG_WRT_EPS_: tl.constexpr,
        WEIGHTED: tl.constexpr,
        OFFICIAL: tl.constexpr,
        SOFT: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        DOT_NATIVE: tl.constexpr,
        PREC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = (pid * BM + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < N
        lab_i = tl.load(LAB + rows, mask=rmask, other=0)
        ninf = float("-inf")
        if WEIGHTED:
            # Online softmax state: running max, sum of exp, sum of exp * d (per anchor).
            mp = tl.full((BM,), ninf, tl.float32)
            zp = tl.zeros((BM,), tl.float32)
            sp = tl.zeros((BM,), tl.float32)
            mn = tl.full((BM,), ninf, tl.float32)
            zn = tl.zeros((BM,), tl.float32)
            sn = tl.zeros((BM,), tl.float32)
            ipw = tl.zeros((BM,), tl.int32)  # farthest positive (official form's max)
        else:
            bp = tl.full((BM,), ninf, tl.float32)  # hardest positive distance so far
            ip = tl.zeros((BM,), tl.int32)
            sbp = tl.zeros((BM,), tl.float32)  # its unclamped s (backward needs the clamp mask)
            bn = tl.full((BM,), float("inf"), tl.float32)
            i_n = tl.full((BM,), -1, tl.int32)  # stays -1 when the anchor has no negative
            sbn = tl.zeros((BM,), tl.float32)
        for n0 in range(0, N, BN):
            cols = (n0 + tl.arange(0, BN)).to(tl.int64)
            cmask = cols < N
            s = _sq_dist_tile(
                X, X, rows, cols, rmask, cmask, D, sxn, sxd, sxn, sxd, BM, BN, BK, DOT_NATIVE, PREC
            )
            s = tl.where(rows[:, None] == cols[None, :], 0.0, s)
            d = tl.sqrt(tl.maximum(s, EPS_))
            lab_j = tl.load(LAB + cols, mask=cmask, other=0)
            same = lab_i[:, None] == lab_j[None, :]
            pos = same & cmask[None, :]
            neg = (~same) & cmask[None, :]
            if WEIGHTED:
                t = tl.where(pos, d, ninf)
                tmax = tl.max(t, axis=1)
                if OFFICIAL:
                    # Strict '>' keeps the earlier block on ties: lowest index overall.
                    targ = tl.argmax(t, axis=1, tie_break_left=True)
                    ipw = tl.where(tmax > mp, targ + n0, ipw)
                m_new = tl.maximum(mp, tmax)
                m_safe = tl.where(m_new == ninf, 0.0, m_new)  # no positive seen yet
                alpha = tl.exp(mp - m_safe)
                e = tl.where(pos, tl.exp(d - m_safe[:, None]), 0.0)
                zp = zp * alpha + tl.sum(e, axis=1)
                sp = sp * alpha + tl.sum(e * d, axis=1)
                mp = m_new
                t = tl.where(neg, -d, ninf)
                m_new = tl.maximum(mn, tl.max(t, axis=1))
                m_safe = tl.where(m_new == ninf, 0.0, m_new)
                alpha = tl.exp(mn - m_safe)
                e = tl.where(neg, tl.exp(-d - m_safe[:, None]), 0.0)
                zn = zn * alpha + tl.sum(e, axis=1)
                sn = sn * alpha + tl.sum(e * d, axis=1)
                mn = m_new
            else:
                local = tl.arange(0, BN)
                t = tl.where(pos, d, ninf)
                tmax = tl.max(t, axis=1)
                targ = tl.argmax(t, axis=1, tie_break_left=True)
                # Strict '>' keeps the earlier block on ties: lowest index overall.
                upd = tmax > bp
                ts = tl.sum(tl.where(local[None, :] == targ[:, None], s, 0.0), axis=1)
                bp = tl.where(upd, tmax, bp)
                ip = tl.where(upd, targ + n0, ip)
                sbp = tl.where(upd, ts, sbp)
                t = tl.where(neg, d, float("inf"))
                tmin = tl.min(t, axis=1)
                targ = tl.argmin(t, axis=1, tie_break_left=True)
                upd = tmin < bn
                ts = tl.sum(tl.where(local[None, :] == targ[:, None], s, 0.0), axis=1)
                bn = tl.where(upd, tmin, bn)
                i_n = tl.where(upd, targ + n0, i_n)
                sbn = tl.where(upd, ts, sbn)
        if WEIGHTED:
            has_neg = zn > 0.0
            zn_safe = tl.where(has_neg, zn, 1.0)
            zp_safe = tl.where(zp > 0.0, zp, 1.0)  # only padding rows have zp = 0
            if OFFICIAL:
                # w = e^(d - mp) / (zp + eps); v = e^(-d) / (zn e^mn + eps), so
                # lse_n = logaddexp(mn + log zn, log eps) (no overflow for any distance).
                mp_safe = tl.where(mp == ninf, 0.0, mp)
                zp_eps = zp + WRT_EPS_
                d_ap = sp / zp_eps
                lse_p = mp_safe + tl.log(zp_eps)
                a = tl.where(has_neg, mn + tl.log(zn_safe), LOG_WRT_EPS_)
                hi = tl.maximum(a, LOG_WRT_EPS_)
                lse_n = hi + tl.log(1.0 + tl.exp(tl.minimum(a, LOG_WRT_EPS_) - hi))
                d_an = tl.where(has_neg, sn * tl.exp(tl.where(has_neg, mn, 0.0) - lse_n), 0.0)
                tl.store(K_AP + rows, d_ap * WRT_EPS_ / zp_eps, mask=rmask)
                tl.store(I_AP + rows, ipw, mask=rmask)
                valid = tl.full((BM,), 1.0, tl.float32)  # every anchor counts, d_an = 0 if none
            else:
                d_ap = sp / zp_safe
                d_an = tl.where(has_neg, sn / zn_safe, 0.0)
                lse_p = mp + tl.log(zp_safe)
                lse_n = tl.where(has_neg, mn + tl.log(zn_safe), 0.0)
                valid = tl.where(has_neg, 1.0, 0.0)
            tl.store(D_AP + rows, d_ap, mask=rmask)
            tl.store(D_AN + rows, d_an, mask=rmask)
            tl.store(LSE_P + rows, lse_p, mask=rmask)
            tl.store(LSE_N + rows, lse_n, mask=rmask)
        else:
            has_neg = i_n >= 0
            d_ap = tl.sqrt(tl.maximum(sbp, EPS_))
            d_an = tl.where(has_neg, tl.sqrt(tl.maximum(sbn, EPS_)), 0.0)
            tl.store(S_AP + rows, sbp, mask=rmask)
            tl.store(S_AN + rows, sbn, mask=rmask)
            tl.store(I_AP + rows, ip, mask=rmask)
            tl.store(I_AN + rows, i_n, mask=rmask)
            valid = tl.where(has_neg, 1.0, 0.0)
        # Per-anchor loss, validity and dloss/dz, so the host only sums two rows of OUT.
        z = d_ap - d_an
        if SOFT:
            # softplus(z) = max(z, 0) + log(1 + e^-|z|), sigmoid(z) from the same e^-|z|:
            # no overflow for any z (torch's softplus returns z above 20; equal in fp32).
            e = tl.exp(-tl.abs(z))
            loss = tl.maximum(z, 0.0) + tl.log(1.0 + e)
            dz = tl.where(z >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
        else:
            t = z + MARGIN
            loss = tl.maximum(t, 0.0)
            dz = tl.where(t > 0.0, 1.0, 0.0)  # relu'(0) = 0, as torch
        tl.store(OUT + rows, tl.where(valid > 0.0, loss, 0.0), mask=rmask)
        tl.store(OUT + N + rows, valid, mask=rmask)
        tl.store(OUT + 2 * N + rows, tl.where(valid > 0.0, dz, 0.0), mask=rmask)

    @triton.jit
    def _hard_bwd_kernel(
        X,
        DZ,
        S_AP,
        S_AN,
        I_AP,
        I_AN,
        G,
        CNT,
        DX,
        N,
        D,
        sxn,
        sxd,
        sdn,
        sdd,
        EPS_: tl.constexpr,
        BM: tl.constexpr,
        BD: tl.constexpr,
    ):
        """Sparse batch-hard gradient: anchor i touches only x_i, x_p(i) and x_n(i).

        ``dd_ij/dx_i = (x_i - x_j) / d_ij`` where ``s_ij >= EPS`` (0 under the clamp) and the
        opposite for x_j; the scatter to p(i), n(i) uses fp32 atomics into a zeroed DX, so the
        summation order (not the math) varies between runs, as with ``index_add_`` on CUDA.
        """
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < N
        dcols = tl.program_id(1) * BD + tl.arange(0, BD)
        m2 = rmask[:, None] & (dcols < D)[None, :]
        scale = tl.load(G) / tl.maximum(tl.load(CNT), 1.0)
        c = tl.load(DZ + rows, mask=rmask, other=0.0) * scale  # 0 for anchors without negative
        s_ap = tl.load(S_AP + rows, mask=rmask, other=0.0)
        s_an = tl.load(S_AN + rows, mask=rmask, other=0.0)
        i_p = tl.load(I_AP + rows, mask=rmask, other=0).to(tl.int64)
        i_n = tl.maximum(tl.load(I_AN + rows, mask=rmask, other=0), 0).to(tl.int64)
        cp = tl.where(s_ap >= EPS_, c / tl.sqrt(tl.maximum(s_ap, EPS_)), 0.0)
        cn = tl.where(s_an >= EPS_, -c / tl.sqrt(tl.maximum(s_an, EPS_)), 0.0)
        xi = tl.load(X + rows[:, None] * sxn + dcols[None, :] * sxd, mask=m2, other=0.0).to(
            tl.float32
        )
        xp = tl.load(X + i_p[:, None] * sxn + dcols[None, :] * sxd, mask=m2, other=0.0).to(
            tl.float32
        )
        xn = tl.load(X + i_n[:, None] * sxn + dcols[None, :] * sxd, mask=m2, other=0.0).to(
            tl.float32
        )
        gp = cp[:, None] * (xi - xp)
        gn = cn[:, None] * (xi - xn)
        tl.atomic_add(DX + rows[:, None] * sdn + dcols[None, :] * sdd, gp + gn, mask=m2)
        tl.atomic_add(DX + i_p[:, None] * sdn + dcols[None, :] * sdd, -gp, mask=m2)
        tl.atomic_add(DX + i_n[:, None] * sdn + dcols[None, :] * sdd, -gn, mask=m2)

    @triton.jit
    def _wrt_coef(d, pos, neg, c, dp, dn, lsep, lsen):
        """dL/dd for the pairs of a tile, seen from the anchors whose stats are given.

        ``d+ = sum w d``, ``w = softmax(d)`` over P: ``dd+/dd_j = w_j (1 + d_j - d+)``;
        ``d- = sum v d``, ``v = softmax(-d)`` over N: ``dd-/dd_j = v_j (1 - d_j + d-)``.
        The official form's weights (``e^d / (Z + eps)``) have the same derivatives given its own
        ``lse`` and ``d+``, ``d-``; its max term is added by the caller. The ``where`` guards
        come before any product so exp overflow off-mask never leaks.
        """
        w = tl.where(pos, tl.exp(tl.minimum(d - lsep, 0.0)), 0.0)
        v = tl.where(neg, tl.exp(tl.minimum(-d - lsen, 0.0)), 0.0)
        return c * (w * (1.0 + d - dp) - v * (1.0 - d + dn))

    @triton.jit
    def _wrt_bwd_kernel(
        X,
        LAB,
        DZ,
        G,
        CNT,
        DP,
        DN,
        LSEP,
        LSEN,
        KAP,
        IAP,
        DX,
        N,
        D,
        sxn,
        sxd,
        sdn,
        sdd,
        EPS_: tl.constexpr,
        OFFICIAL: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        BD: tl.constexpr,
        DOT_NATIVE: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """dx_k = sum_j B_kj (x_k - x_j), B_kj = (G_kj + G_jk) / d_kj on active pairs.

        G_ij = c_i dz_i/dd_ij is the coefficient of d_ij in anchor i's loss; d_ij = d_ji, so the
        transposed term is the same tile evaluated with the column anchors' statistics. One
        program owns a (BM, BD) block of dx and re-streams the rows, recomputing s (no atomics,
        deterministic, O(N) saved state). The official form adds ``-c_i k_i`` to ``G_i,p(i)``,
        the derivative through its max (``k_i = d+_i eps / (Z_i + eps)``, ``p(i)`` the farthest
        positive).
        """
        pid_m = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < N
        dcols = pid_d * BD + tl.arange(0, BD)
        dmask = dcols < D
        lab_i = tl.load(LAB + rows, mask=rmask, other=0)
        # c_i = dLoss/dz_i = g * dz_i / (number of valid anchors), 0 for invalid anchors.
        scale = tl.load(G) / tl.maximum(tl.load(CNT), 1.0)
        c_i = tl.load(DZ + rows, mask=rmask, other=0.0) * scale
        dp_i = tl.load(DP + rows, mask=rmask, other=0.0)
        dn_i = tl.load(DN + rows, mask=rmask, other=0.0)
        lp_i = tl.load(LSEP + rows, mask=rmask, other=0.0)
        ln_i = tl.load(LSEN + rows, mask=rmask, other=0.0)
        if OFFICIAL:
            ck_i = c_i * tl.load(KAP + rows, mask=rmask, other=0.0)
            ip_i = tl.load(IAP + rows, mask=rmask, other=0).to(tl.int64)
        acc = tl.zeros((BM, BD), dtype=tl.float32)
        rs = tl.zeros((BM,), dtype=tl.float32)
        for n0 in range(0, N, BN):
            cols = (n0 + tl.arange(0, BN)).to(tl.int64)
            cmask = cols < N
            m2 = rmask[:, None] & cmask[None, :]
            s = _sq_dist_tile(
                X, X, rows, cols, rmask, cmask, D, sxn, sxd, sxn, sxd, BM, BN, BK, DOT_NATIVE, PREC
            )
            active = m2 & (s >= EPS_) & (rows[:, None] != cols[None, :])
            d = tl.sqrt(tl.maximum(s, EPS_))
            lab_j = tl.load(LAB + cols, mask=cmask, other=0)
            same = lab_i[:, None] == lab_j[None, :]
            pos = same & m2
            neg = (~same) & m2
            c_j = tl.load(DZ + cols, mask=cmask, other=0.0) * scale
            dp_j = tl.load(DP + cols, mask=cmask, other=0.0)
            dn_j = tl.load(DN + cols, mask=cmask, other=0.0)
            lp_j = tl.load(LSEP + cols, mask=cmask, other=0.0)
            ln_j = tl.load(LSEN + cols, mask=cmask, other=0.0)
            g = _wrt_coef(
                d,
                pos,
                neg,
                c_i[:, None],
                dp_i[:, None],
                dn_i[:, None],
                lp_i[:, None],
                ln_i[:, None],
            )
            g += _wrt_coef(
                d,
                pos,
                neg,
                c_j[None, :],
                dp_j[None, :],
                dn_j[None, :],
                lp_j[None, :],
                ln_j[None, :],
            )
            if OFFICIAL:
                ck_j = c_j * tl.load(KAP + cols, mask=cmask, other=0.0)
                ip_j = tl.load(IAP + cols, mask=cmask, other=0).to(tl.int64)
                g -= tl.where(cols[None, :] == ip_i[:, None], ck_i[:, None], 0.0)
                g -= tl.where(rows[:, None] == ip_j[None, :], ck_j[None, :], 0.0)
            b = tl.where(active, g / d, 0.0)
            rs += tl.sum(b, axis=1)
            xj = tl.load(
                X + cols[:, None] * sxn + dcols[None, :] * sxd,
                mask=cmask[:, None] & dmask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc = tl.dot(b, xj, acc, input_precision=PREC)
        xi = tl.load(
            X + rows[:, None] * sxn + dcols[None, :] * sxd,
            mask=rmask[:, None] & dmask[None, :],
            other=0.0,
        ).to(tl.float32)
        tl.store(
            DX + rows[:, None] * sdn + dcols[None, :] * sdd,
            rs[:, None] * xi - acc,
            mask=rmask[:, None] & dmask[None, :],
        )


def _launch_forward(
    x: torch.Tensor, labels: torch.Tensor, margin: float | None, weighted: bool, official: bool
):
    """Run the fused forward; returns (out (3, N): loss/valid/dz rows, row stats): hard: s_ap,
    s_an, i_ap, i_an; weighted: d_ap, d_an, lse_p, lse_n, k_ap, i_ap (the last two are read by
    the official form's backward only).
    """
    n, d = x.shape
    dev = x.device
    out = new_buffer((3, n), dev)
    f0, f1, f2, f3, f4 = (new_buffer((n,), dev) for _ in range(5))
    i0 = new_buffer((n,), dev, torch.int32)
    i1 = new_buffer((n,), dev, torch.int32)
    b = blocks_for(dev, x.dtype)
    native, prec = dot_config(x.dtype, dev)
    # Hard mode fills (S_AP, S_AN, I_AP, I_AN) = (f0, f1, i0, i1); weighted mode fills
    # (D_AP, D_AN, LSE_P, LSE_N) = (f0, f1, f2, f3), and the official form also (K_AP, I_AP) =
    # (f4, i0). The other slots are not touched.
    _triplet_fwd_kernel[(cdiv(n, b["BR"]),)](
        x, labels, f0, f1, i0, i1, f0, f1, f2, f3, f4, out,
        n, d, x.stride(0), x.stride(1), 0.0 if margin is None else float(margin), EPS,
        WRT_EPS, _LOG_WRT_EPS, WEIGHTED=weighted, OFFICIAL=weighted and official,
        SOFT=margin is None,
        BM=b["BR"], BN=b["BN"], BK=b["BK"], DOT_NATIVE=native, PREC=prec, num_warps=b["WF"],
    )  # fmt: skip
    stats = (f0, f1, f2, f3, f4, i0) if weighted else (f0, f1, i0, i1)
    return out, stats


class _TripletLoss(torch.autograd.Function):
    """Saves the inputs and O(N) row statistics; backward re-derives every coefficient."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        labels: torch.Tensor,
        margin: float | None,
        mode: str,
        wrt_form: str,
    ) -> torch.Tensor:
        weighted = mode == "weighted"
        official = wrt_form == "official"
        out, stats = _launch_forward(x, labels, margin, weighted, official)
        tot = out[:2].sum(dim=1)  # (sum of anchor losses, number of anchors counted)
        ctx.weighted = weighted
        ctx.official = official
        ctx.save_for_backward(x, labels, out, tot, *stats)
        return tot[0] / tot[1].clamp_min(1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        x, labels, out, tot, *stats = ctx.saved_tensors
        g = grad.float().reshape(1)  # stays on the device: no host sync in backward
        dz, cnt = out[2], tot[1:]
        if ctx.weighted:
            dx = _wrt_backward(x, labels, dz, g, cnt, *stats, official=ctx.official)
        elif torch.are_deterministic_algorithms_enabled():
            dx = _hard_backward_torch(x, dz, g, cnt, *stats)
        else:
            dx = _hard_backward(x, dz, g, cnt, *stats)
        return dx.to(x.dtype), None, None, None, None


def _hard_backward(x, dz, g, cnt, s_ap, s_an, i_ap, i_an) -> torch.Tensor:
    n, d = x.shape
    dx = torch.zeros((n, d), dtype=torch.float32, device=x.device)  # atomics accumulate into it
    if n == 0 or d == 0:
        return dx
    b = blocks_for(x.device, x.dtype)
    _hard_bwd_kernel[(cdiv(n, b["BM"]), cdiv(d, b["BD"]))](
        x, dz, s_ap, s_an, i_ap, i_an, g, cnt, dx,
        n, d, x.stride(0), x.stride(1), dx.stride(0), dx.stride(1), EPS,
        BM=b["BM"], BD=b["BD"], num_warps=b["WF"],
    )  # fmt: skip
    return dx


def _hard_backward_torch(x, dz, g, cnt, s_ap, s_an, i_ap, i_an) -> torch.Tensor:
    """Same gradient as ``_hard_bwd_kernel`` with ``index_add_``, which is deterministic under
    ``torch.use_deterministic_algorithms(True)`` (the kernel's fp32 atomics are not)."""
    xf = x.float()
    c = dz * (g / cnt.clamp_min(1.0))
    i_ap, i_an = i_ap.long(), i_an.long().clamp_min(0)
    zero = torch.zeros_like(c)
    coef_p = torch.where(s_ap >= EPS, c / s_ap.clamp_min(EPS).sqrt(), zero)
    coef_n = torch.where(s_an >= EPS, -c / s_an.clamp_min(EPS).sqrt(), zero)
    gp = coef_p[:, None] * (xf - xf[i_ap])
    gn = coef_n[:, None] * (xf - xf[i_an])
    dx = gp + gn
    dx.index_add_(0, i_ap, -gp)
    dx.index_add_(0, i_an, -gn)
    return dx


def _wrt_backward(
    x, labels, dz, g, cnt, d_ap, d_an, lse_p, lse_n, k_ap, i_ap, *, official: bool
) -> torch.Tensor:
    n, d = x.shape
    dx = new_buffer((n, d), x.device)
    if n == 0 or d == 0:
        return dx
    b = blocks_for(x.device, x.dtype)
    native, prec = dot_config(x.dtype, x.device)
    _wrt_bwd_kernel[(cdiv(n, b["BR"]), cdiv(d, b["BD"]))](
        x, labels, dz, g, cnt, d_ap, d_an, lse_p, lse_n, k_ap, i_ap, dx,
        n, d, x.stride(0), x.stride(1), dx.stride(0), dx.stride(1), EPS, OFFICIAL=official,
        BM=b["BR"], BN=b["BN"], BK=b["BK"], BD=b["BD"], DOT_NATIVE=native, PREC=prec,
        num_warps=b["WB"],
    )  # fmt: skip
    return dx


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def _anchor_losses(d_ap: torch.Tensor, d_an: torch.Tensor, margin: float | None) -> torch.Tensor:
    z = d_ap - d_an
    return F.softplus(z) if margin is None else F.relu(z + margin)


def _masked_mean(per_anchor: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    count = valid.sum().clamp_min(1).to(per_anchor.dtype)
    return torch.where(valid, per_anchor, torch.zeros_like(per_anchor)).sum() / count


def _lowest_index_where(mask: torch.Tensor) -> torch.Tensor:
    n = mask.shape[1]
    idx = torch.arange(n, device=mask.device).expand_as(mask)
    return torch.where(mask, idx, torch.full_like(idx, n)).min(dim=1).values


def _official_wrt_weights(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The released WRT's row weights (module docstring): the shift is the row max of
    ``logits * mask`` (masked entries count as 0; ``max`` sends its gradient to the first
    maximum), and ``WRT_EPS`` joins the denominator."""
    shift = (logits * mask).max(dim=1, keepdim=True).values
    e = torch.exp(logits - shift) * mask
    return e / (e.sum(dim=1, keepdim=True) + WRT_EPS)


def triplet_mining_loss_reference(
    x: torch.Tensor,
    labels: torch.Tensor,
    margin: float | None = 0.3,
    mode: str = "hard",
    wrt_form: str = "exact",
) -> torch.Tensor:
    """Plain-torch ground truth of :func:`triplet_mining_loss` (float64-capable)."""
    if wrt_form not in WRT_FORMS:
        raise ValueError(f"wrt_form must be one of {WRT_FORMS}, got {wrt_form!r}")
    dist = pairwise_distance_reference(x)
    n = dist.shape[0]
    pos = labels[:, None] == labels[None, :]
    neg = ~pos
    valid = neg.any(dim=1)
    if mode == "hard":
        ninf = torch.full_like(dist, float("-inf"))
        pinf = torch.full_like(dist, float("inf"))
        dp = torch.where(pos, dist, ninf)
        ip = _lowest_index_where(dp == dp.max(dim=1, keepdim=True).values)
        dn = torch.where(neg, dist, pinf)
        i_n = _lowest_index_where(neg & (dn == dn.min(dim=1, keepdim=True).values))
        i_n = i_n.clamp_max(n - 1)  # anchors without negatives: any column, masked below
        d_ap = dist.gather(1, ip[:, None]).squeeze(1)
        d_an = torch.where(valid, dist.gather(1, i_n[:, None]).squeeze(1), torch.zeros_like(d_ap))
    elif mode == "weighted" and wrt_form == "official":
        if n == 0:
            return dist.sum()
        posf, negf = pos.to(dist.dtype), neg.to(dist.dtype)
        d_pos, d_neg = dist * posf, dist * negf
        d_ap = (d_pos * _official_wrt_weights(d_pos, posf)).sum(dim=1)
        d_an = (d_neg * _official_wrt_weights(-d_neg, negf)).sum(dim=1)
        valid = torch.ones_like(valid)  # every anchor counts (d_an = 0 without a negative)
    elif mode == "weighted":
        ninf = torch.full_like(dist, float("-inf"))
        w_p = torch.softmax(torch.where(pos, dist, ninf), dim=1)  # self is always positive
        d_ap = (w_p * dist).sum(dim=1)
        logits_n = torch.where(neg, -dist, ninf)
        # Rows without a negative would softmax all -inf (NaN); give them finite logits, then
        # the neg mask zeroes their weights.
        logits_n = torch.where(valid[:, None], logits_n, torch.zeros_like(dist))
        w_n = torch.softmax(logits_n, dim=1) * neg
        d_an = (w_n * dist).sum(dim=1)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return _masked_mean(_anchor_losses(d_ap, d_an, margin), valid)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def triplet_mining_loss(
    x: torch.Tensor,
    labels: torch.Tensor,
    margin: float | None = 0.3,
    mode: str = "hard",
    backend: str = "auto",
    wrt_form: str = "exact",
) -> torch.Tensor:
    """Scalar mean over anchors of ``[d_ap - d_an + margin]_+`` (``softplus(d_ap - d_an)`` when
    ``margin is None``), mining in the batch; see the module docstring for the modes, the two
    forms of the weighted mode (``wrt_form="exact" | "official"``, ignored in hard mode) and the
    handling of anchors without negatives or without other positives.

    ``x`` (N, D) float features (bf16/fp16 upcast to fp32; float64 on the torch backend),
    ``labels`` (N,) integer identities. Differentiable in ``x``; returns an fp32 scalar
    (float64 for float64 input on the torch backend).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if wrt_form not in WRT_FORMS:
        raise ValueError(f"wrt_form must be one of {WRT_FORMS}, got {wrt_form!r}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-D float tensor, got {tuple(x.shape)} {x.dtype}")
    if labels.shape != (x.shape[0],) or labels.is_floating_point():
        raise ValueError(
            f"labels must be an integer tensor of shape ({x.shape[0]},), got "
            f"{tuple(labels.shape)} {labels.dtype}"
        )
    if resolve_backend(backend, x, labels) == "torch":
        return triplet_mining_loss_reference(x, labels, margin, mode, wrt_form)
    if x.shape[0] == 0:
        return x.float().sum() * 0.0
    return _TripletLoss.apply(x, labels.contiguous(), margin, mode, wrt_form)


__all__ = [
    "MODES",
    "WRT_EPS",
    "WRT_FORMS",
    "triplet_mining_loss",
    "triplet_mining_loss_reference",
]
