"""PDM's objective (methods.md section 2.2): L_id, L_tri, L_cpm, L_ch, L_dcs and the code's L_ort.

Every term is a plain function of tensors (float64-capable on the torch kernels backend, for
gradient checks); :class:`PDMLoss` assembles them from the model outputs. Distances and centers go
through ``reid_kernels``. The batch holds ``S`` feature sets stacked along the rows ([original;
generated 1; ...]); each set is in the sampler's layout, so the labels repeat ``S`` times.

Given that layout (a :class:`reid_kernels.BatchLayout`), the identity and modality of every row
follow from its position, so the terms take their segments from arange arithmetic instead of
``torch.unique`` / comparisons of the labels, and nothing syncs with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from reid_kernels import (
    BatchLayout,
    check_layout,
    pairwise_distance,
    segment_mean,
    triplet_mining_loss,
)
from torch import nn

from dist_reid.losses.identity import identity_loss

CH_FORMS = ("code", "cosine")
CPM_FORMS = ("code", "paper")
DCS_FORMS = ("code", "paper")
ORT_FORMS = ("released", "normalized")


def _compact(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Labels mapped to 0..P-1 (sorted identity order) and P (``torch.unique``: a host sync)."""
    uniq, inverse = torch.unique(labels, return_inverse=True)
    return inverse, int(uniq.numel())


def _layout_slots(rows: int, layout: BatchLayout, device: torch.device) -> torch.Tensor:
    """Each row's identity slot (0..P-1, the sampler's order) in ``rows`` rows that repeat the
    layout's ``2 P K`` rows: position arithmetic, no values read."""
    k = layout.instances
    return (torch.arange(rows, device=device) % (layout.identities * k)) // k


def _layout_modalities(layout: BatchLayout, device: torch.device) -> torch.Tensor:
    """Each row's modality (0 visible, 1 infrared) in one layout batch, from its half."""
    half = torch.arange(layout.rows, device=device) // (layout.identities * layout.instances)
    return half ^ int(layout.infrared_first)


def _check_rows(labels: torch.Tensor, rows: int, layout: BatchLayout) -> None:
    if rows % layout.rows:
        raise ValueError(f"layout {tuple(layout)} has {layout.rows} rows per set, got {rows} rows")
    if labels.shape[0] != rows:
        raise ValueError(f"{labels.shape[0]} labels for {rows} rows")


def _diag_distance(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    """``|a_i - b_i|`` per row, through the kernels (the diagonal of the pairwise matrix)."""
    return torch.diagonal(pairwise_distance(a, b, backend=backend))


def _min_other(dist: torch.Tensor) -> torch.Tensor:
    """Row minimum over the off-diagonal entries of a square matrix."""
    eye = torch.eye(dist.shape[0], dtype=torch.bool, device=dist.device)
    return dist.masked_fill(eye, float("inf")).min(dim=1).values


def cpm_loss(
    features: torch.Tensor,
    generated: torch.Tensor,
    labels: torch.Tensor,
    modalities: torch.Tensor,
    margin: float = 0.2,
    form: str = "code",
    backend: str = "auto",
    stop_gradient: bool = True,
    layout: BatchLayout | None = None,
) -> torch.Tensor:
    """Center-guided pair mining between original and one generated set (same row order).

    Centers per identity of V, IR, V+ (generated from visible rows) and IR+. ``form="code"``
    (the released code, averaged over identities j and the two directions):
    ``[D(c_ir,c_v+) - sg D(c_v,c_v+) + a]_+ + 0.5 [D(c_ir,c_v+) - min_k D(c_v+^j,c_v+^k) + a]_+
    + 0.5 [D(c_ir,c_v+) - min_k D(c_v^j,c_v^k) + a]_+`` and the same with v <-> ir.
    ``stop_gradient=False`` drops the code's detach (sg), for gradient checks only.
    ``form="paper"`` (eq. 3-5, mean over j and k != j, summed over both directions):
    ``[D(c_ir^j,c_v+^j) - D(c_v^j,c_v+^j) - D(c_v^j,c_v^k) + a]_+``.
    ``layout``: the rows are one :class:`reid_kernels.BatchLayout` batch (not checked here;
    :func:`reid_kernels.check_layout`); identities then come in slot order, not sorted, which
    permutes the centers and leaves the value unchanged, and nothing syncs with the host.
    """
    if form not in CPM_FORMS:
        raise ValueError(f"loss.options.cpm_form must be one of {CPM_FORMS}, got {form!r}")
    if layout is None:
        ids, p = _compact(labels)
        ir = (modalities != 0).long()
    else:
        if features.shape[0] != layout.rows:
            raise ValueError(
                f"layout {tuple(layout)} has {layout.rows} rows, features {features.shape[0]}"
            )
        _check_rows(labels, layout.rows, layout)
        ids, p = _layout_slots(layout.rows, layout, labels.device), layout.identities
        ir = _layout_modalities(layout, labels.device)
    seg = torch.cat([ir * p + ids, (2 + ir) * p + ids])
    centers = segment_mean(torch.cat([features, generated]), seg, 4 * p, backend=backend)
    c_v, c_ir, c_vg, c_irg = centers.split(p)
    total = features.new_zeros(())
    for own, other, gen in ((c_v, c_ir, c_vg), (c_ir, c_v, c_irg)):
        d_cross = _diag_distance(other, gen, backend)  # D(c_other^j, c_gen^j)
        d_own = _diag_distance(own, gen, backend)  # D(c_own^j, c_gen^j)
        d_own_own = pairwise_distance(own, backend=backend)  # D(c_own^j, c_own^k)
        if form == "code":
            d_gen_gen = pairwise_distance(gen, backend=backend)
            term = (
                F.relu(d_cross - (d_own.detach() if stop_gradient else d_own) + margin)
                + 0.5 * F.relu(d_cross - _min_other(d_gen_gen) + margin)
                + 0.5 * F.relu(d_cross - _min_other(d_own_own) + margin)
            )
            total = total + 0.5 * term.mean()
        else:
            hinge = F.relu((d_cross - d_own)[:, None] - d_own_own + margin)
            off = ~torch.eye(p, dtype=torch.bool, device=hinge.device)
            total = total + (hinge * off).sum() / max(p * (p - 1), 1)
    return total


def ch_loss(
    prototype_logits: torch.Tensor, form: str = "code", backend: str = "auto"
) -> torch.Tensor:
    """Prototype heterogeneity over the (N, m, n) responses; minimising it spreads prototypes.

    ``form="code"``: ``-mean_{samples, i<j} sqrt(mean_n (S_in - S_jn)^2)`` with ``S = sigmoid``
    (the released code). ``form="cosine"``: ``mean_{samples, i<j} cos(R_i, R_j)`` of the raw
    responses, i.e. paper eq. 9 with the sign that matches its stated goal (as printed, eq. 9
    would reward similar prototypes; methods.md risk 3).
    """
    if form not in CH_FORMS:
        raise ValueError(f"loss.options.ch_form must be one of {CH_FORMS}, got {form!r}")
    n, m, positions = prototype_logits.shape
    if m < 2:
        return prototype_logits.sum() * 0.0
    if form == "code":
        rows = torch.sigmoid(prototype_logits).reshape(n * m, positions)
    else:
        rows = F.normalize(prototype_logits, dim=2).reshape(n * m, positions)
    # One block-diagonal pairwise matrix: each sample's m x m block, pairs i < j.
    dist = pairwise_distance(rows, squared=form == "cosine", backend=backend)
    blocks = dist.reshape(n, m, n, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (n, m, m)
    iu = torch.triu_indices(m, m, offset=1, device=dist.device)
    pairs = blocks[:, iu[0], iu[1]]
    if form == "code":
        return -(pairs / positions**0.5).mean()
    return (1.0 - pairs / 2.0).mean()  # cos = 1 - |a - b|^2 / 2 on unit vectors


def dcs_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    rho1: float = 0.01,
    rho2: float = 0.7,
    form: str = "code",
    anchor_stride: int = 4,
    backend: str = "auto",
    layout: BatchLayout | None = None,
) -> torch.Tensor:
    """Dual-center separation: ``mean_i [|F_i - c_{y_i}| - rho1]_+`` plus a centroid push.

    ``form="paper"`` (eq. 10): ``2/(M(M-1)) sum_{j<k} [rho2 - |c_j - c_k|]_+``. ``form="code"``:
    every ``anchor_stride``-th row is an anchor; per anchor, the mean over rows of other
    identities of ``[rho2 - |c_{y_a} - c_{y_o}|]_+``, averaged over anchors.
    ``layout``: the rows are sets of one :class:`reid_kernels.BatchLayout` batch each (the
    labels repeat per set); identities come from the row positions, without a host sync.
    """
    if form not in DCS_FORMS:
        raise ValueError(f"loss.options.dcs_form must be one of {DCS_FORMS}, got {form!r}")
    if layout is None:
        ids, p = _compact(labels)
    else:
        _check_rows(labels, features.shape[0], layout)
        ids, p = _layout_slots(features.shape[0], layout, labels.device), layout.identities
    centers = segment_mean(features, ids, p, backend=backend)
    to_center = pairwise_distance(features, centers, backend=backend)
    pull = F.relu(to_center.gather(1, ids[:, None]).squeeze(1) - rho1).mean()
    if p < 2:
        return pull
    cdist = pairwise_distance(centers, backend=backend)
    if form == "paper":
        iu = torch.triu_indices(p, p, offset=1, device=cdist.device)
        return pull + F.relu(rho2 - cdist[iu[0], iu[1]]).mean()
    anchors = ids[::anchor_stride]
    hinge = F.relu(rho2 - cdist[anchors][:, ids])  # (anchors, rows)
    other = (anchors[:, None] != ids[None, :]).to(hinge.dtype)
    per_anchor = (hinge * other).sum(1) / other.sum(1).clamp_min(1)
    return pull + per_anchor.mean()


def ort_loss(generated: list[torch.Tensor], form: str = "released") -> torch.Tensor:
    """``sum_rows sum_{b<b'} <f_b, f_b'> / (S N)`` over the generated global features (DEEN's
    orthogonality term; code only; ``S = 1 + len(generated)`` sets of N rows).

    ``form="released"``: raw inner products, as the released code (at pre-BN feature scale the
    term is hundreds of times larger than the cosine one). ``form="normalized"``: cosines.
    """
    if form not in ORT_FORMS:
        raise ValueError(f"loss.options.ort_form must be one of {ORT_FORMS}, got {form!r}")
    if len(generated) < 2:
        return generated[0].sum() * 0.0 if generated else torch.zeros(())
    feats = [F.normalize(g, dim=1) if form == "normalized" else g for g in generated]
    total = feats[0].new_zeros(())
    for i in range(len(feats)):
        for j in range(i + 1, len(feats)):
            total = total + (feats[i] * feats[j]).sum()
    return total / (feats[0].shape[0] * (len(feats) + 1))


class PDMLoss(nn.Module):
    """Weighted PDM terms (``pdm_official`` defaults; ``pdm_paper`` sets the paper's forms):

    * ``id``: ``id_weight * (CE(head A) + CE(head B))`` over all S sets;
    * ``tri``: batch-hard triplet (margin 0.3) on the pre-BN ``F_g`` of all sets;
    * ``cpm``: ``cpm_weight * sum_{branch, feat in (F_g, F)} cpm_loss`` (code: 0.5 * 0.8 = 0.4,
      margin 0.2, ``cpm_form``);
    * ``ch``: ``ch_weight * ch_loss`` (code: 0.5 * 0.5 = 0.25, ``ch_form``);
    * ``dcs``: ``dcs_weight * dcs_loss`` on the pre-BN ``F`` (code: rho1 0.01, rho2 0.7);
    * ``ort``: ``ort_weight * ort_loss`` (code: 0.01, raw inner products ``ort_form="released"``;
      0 in the paper preset).

    ``batch_layout``: the sampler's :class:`reid_kernels.BatchLayout` of every batch (the
    trainer passes it, not a config key); checked on the first batch, then ``cpm`` and ``dcs``
    run without host syncs. ``None``: arbitrary batches.
    """

    def __init__(
        self,
        id_weight: float = 1.0,
        triplet_weight: float = 1.0,
        margin: float = 0.3,
        cpm_weight: float = 0.4,
        cpm_margin: float = 0.2,
        cpm_form: str = "code",
        ch_weight: float = 0.25,
        ch_form: str = "code",
        dcs_weight: float = 1.0,
        dcs_form: str = "code",
        rho1: float = 0.01,
        rho2: float = 0.7,
        dcs_anchor_stride: int = 4,
        ort_weight: float = 0.01,
        ort_form: str = "released",
        label_smoothing: float = 0.0,
        kernels: str = "auto",
        batch_layout: BatchLayout | None = None,
    ) -> None:
        super().__init__()
        for key, value, allowed in (
            ("cpm_form", cpm_form, CPM_FORMS),
            ("ch_form", ch_form, CH_FORMS),
            ("dcs_form", dcs_form, DCS_FORMS),
            ("ort_form", ort_form, ORT_FORMS),
        ):
            if value not in allowed:
                raise ValueError(f"loss.options.{key} must be one of {allowed}, got {value!r}")
        if dcs_anchor_stride < 1:
            raise ValueError(
                f"loss.options.dcs_anchor_stride must be >= 1, got {dcs_anchor_stride}"
            )
        self.w = {
            "id": id_weight,
            "tri": triplet_weight,
            "cpm": cpm_weight,
            "ch": ch_weight,
            "dcs": dcs_weight,
            "ort": ort_weight,
        }
        self.margin, self.cpm_margin, self.cpm_form = margin, cpm_margin, cpm_form
        self.ch_form, self.dcs_form, self.rho1, self.rho2 = ch_form, dcs_form, rho1, rho2
        self.dcs_anchor_stride, self.ort_form = dcs_anchor_stride, ort_form
        self.label_smoothing, self.kernels = label_smoothing, kernels
        # Checked against the first batch (one sync), then trusted, as ICRE does.
        self.batch_layout = batch_layout
        self._layout_checked = False

    @property
    def required_outputs(self) -> tuple[str, ...]:
        # Head B (``logits_feature``) is read when the model has it (``model.options.plm``).
        keys = ("global", "feature", "logits_global")
        return keys + (("prototype_logits",) if self.w["ch"] else ())

    def forward(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, modalities: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        n = labels.shape[0]
        glob, feat = outputs["global"], outputs["feature"]
        sets = glob.shape[0] // n
        if sets * n != glob.shape[0]:
            raise ValueError(f"PDM outputs have {glob.shape[0]} rows, not a multiple of {n} labels")
        all_labels = labels.repeat(sets)
        k = self.kernels
        layout = self.batch_layout
        if layout is not None and not self._layout_checked:
            check_layout(labels, modalities, layout)
            self._layout_checked = True
        terms: dict[str, torch.Tensor] = {}
        if self.w["id"]:
            heads = [outputs["logits_global"]]
            if "logits_feature" in outputs:
                heads.append(outputs["logits_feature"])
            terms["id"] = self.w["id"] * sum(
                identity_loss(logits, all_labels, self.label_smoothing) for logits in heads
            )
        if self.w["tri"]:
            tri = triplet_mining_loss(glob, all_labels, self.margin, "hard", backend=k)
            terms["tri"] = self.w["tri"] * tri
        if self.w["cpm"] and sets > 1:
            cpm = glob.new_zeros(())
            for x in (glob, feat):
                for s in range(1, sets):
                    gen = x[s * n : (s + 1) * n]
                    cpm = cpm + cpm_loss(
                        x[:n],
                        gen,
                        labels,
                        modalities,
                        self.cpm_margin,
                        self.cpm_form,
                        k,
                        layout=layout,
                    )
            terms["cpm"] = self.w["cpm"] * cpm
        if self.w["ch"]:
            terms["ch"] = self.w["ch"] * ch_loss(outputs["prototype_logits"], self.ch_form, k)
        if self.w["dcs"]:
            terms["dcs"] = self.w["dcs"] * dcs_loss(
                feat,
                all_labels,
                self.rho1,
                self.rho2,
                self.dcs_form,
                self.dcs_anchor_stride,
                k,
                layout=layout,
            )
        if self.w["ort"] and sets > 2:
            generated = [glob[s * n : (s + 1) * n] for s in range(1, sets)]
            terms["ort"] = self.w["ort"] * ort_loss(generated, self.ort_form)
        return terms
