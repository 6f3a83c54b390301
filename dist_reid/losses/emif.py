"""EMIF's objective as a **reconstruction** (methods.md section 4.2; the paper gives only the
abstract):

``L = id_weight * CE(shared) + triplet_weight * triplet(shared)``
``  + sum_{m in {v, r}} [branch_id_weight * CE_m(branch) + intra_weight * L_intra^m]``
``  + beta * L_dist``

* ``L_intra^m``: a triplet loss over modality m's samples only, on the branch features.
* ``L_dist``: the distance between diagonal Gaussians fitted to the visible and the infrared
  shared features, per batch or per identity (then averaged over identities present in both
  modalities). Moments are segment means (:func:`reid_kernels.segment_mean`): ``mu = E[f]``,
  ``var = E[f^2] - mu^2`` (biased) ``+ var_eps``.

  - ``"w2"``: squared 2-Wasserstein, ``sum_d (mu_v - mu_r)^2 + (sigma_v - sigma_r)^2``;
  - ``"kl"``: symmetric KL, ``1/2 sum_d [s_v/s_r + s_r/s_v + (mu_v - mu_r)^2 (1/s_v + 1/s_r)
    - 2]`` with ``s = sigma^2``.

  ``dist_reduction="mean"`` divides the sum over dimensions by D (scale-stable for 2048-d).

Given the sampler's :class:`reid_kernels.BatchLayout`, each row's identity and modality follow
from its position: the per-modality rows are the layout's halves (slices) and the segments are
arange arithmetic, every Gaussian is known to be present, and nothing syncs with the host.
"""

from __future__ import annotations

import torch
from reid_kernels import BatchLayout, check_layout, segment_mean
from torch import nn

from dist_reid.losses.identity import identity_loss
from dist_reid.losses.triplet import (
    batch_hard_triplet,
    check_wrt_form,
    weighted_regularized_triplet,
)

_DIVERGENCES = ("w2", "kl")
_SCOPES = ("batch", "identity")


def gaussian_moments(
    features: torch.Tensor, segments: torch.Tensor, num_segments: int, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment mean and biased variance (num_segments, D), via two segment means."""
    mu = segment_mean(features, segments, num_segments, backend=backend)
    second = segment_mean(features * features, segments, num_segments, backend=backend)
    return mu, (second - mu * mu).clamp_min(0.0)


def gaussian_divergence(
    mu_a: torch.Tensor,
    var_a: torch.Tensor,
    mu_b: torch.Tensor,
    var_b: torch.Tensor,
    divergence: str = "w2",
    reduction: str = "mean",
) -> torch.Tensor:
    """Row-wise divergence between diagonal Gaussians (rows: batch or identities), shape (R,).

    Variances must already include their epsilon (they are divided by / square-rooted).
    """
    if divergence == "w2":
        per_dim = (mu_a - mu_b) ** 2 + (var_a.sqrt() - var_b.sqrt()) ** 2
    elif divergence == "kl":
        diff2 = (mu_a - mu_b) ** 2
        per_dim = 0.5 * (var_a / var_b + var_b / var_a + diff2 * (1 / var_a + 1 / var_b) - 2)
    else:
        raise ValueError(
            f"loss.options.divergence must be one of {_DIVERGENCES}, got {divergence!r}"
        )
    if reduction == "mean":
        return per_dim.mean(dim=1)
    if reduction == "sum":
        return per_dim.sum(dim=1)
    raise ValueError(f"loss.options.dist_reduction must be 'mean' or 'sum', got {reduction!r}")


def distribution_consistency(
    features: torch.Tensor,
    labels: torch.Tensor,
    modalities: torch.Tensor,
    divergence: str = "w2",
    scope: str = "batch",
    reduction: str = "mean",
    var_eps: float = 1e-5,
    backend: str = "auto",
    layout: BatchLayout | None = None,
) -> torch.Tensor:
    """``L_dist`` between the visible and infrared diagonal Gaussians (module docstring).

    0 (with a graph) when no pair of Gaussians can be formed (one modality absent).
    ``layout``: the batch is a :class:`reid_kernels.BatchLayout` (not checked here: see
    :func:`reid_kernels.check_layout`); the same value without a host sync (identities in slot
    order rather than sorted, which only permutes the terms of the mean).
    """
    if scope not in _SCOPES:
        raise ValueError(f"loss.options.dist_scope must be one of {_SCOPES}, got {scope!r}")
    if layout is not None:
        return _layout_consistency(features, layout, divergence, scope, reduction, var_eps, backend)
    mods = modalities.long()
    if scope == "batch":
        seg, num = mods, 2
    else:
        uniq, inv = torch.unique(labels, return_inverse=True)
        seg, num = inv * 2 + mods, 2 * uniq.shape[0]
    mu, var = gaussian_moments(features, seg, num, backend)
    var = var + var_eps
    both = (torch.bincount(seg, minlength=num).view(-1, 2) > 0).all(dim=1)
    if not bool(both.any()):
        return features.sum() * 0.0
    mu, var = mu.view(-1, 2, mu.shape[1])[both], var.view(-1, 2, var.shape[1])[both]
    return gaussian_divergence(
        mu[:, 0], var[:, 0], mu[:, 1], var[:, 1], divergence, reduction
    ).mean()


def _layout_consistency(
    features: torch.Tensor,
    layout: BatchLayout,
    divergence: str,
    scope: str,
    reduction: str,
    var_eps: float,
    backend: str,
) -> torch.Tensor:
    """:func:`distribution_consistency` of a layout batch: segment ``2 * slot + modality`` (or
    the modality alone) from the row position; every segment holds K rows, so all pairs exist."""
    if features.shape[0] != layout.rows:
        raise ValueError(
            f"layout {tuple(layout)} has {layout.rows} rows, features {features.shape[0]}"
        )
    p, k = layout.identities, layout.instances
    rows = torch.arange(layout.rows, device=features.device)
    mods = (rows // (p * k)) ^ int(layout.infrared_first)
    if scope == "batch":
        seg, num = mods, 2
    else:
        seg, num = 2 * ((rows % (p * k)) // k) + mods, 2 * p
    mu, var = gaussian_moments(features, seg, num, backend)
    var = var + var_eps
    return gaussian_divergence(
        mu[0::2], var[0::2], mu[1::2], var[1::2], divergence, reduction
    ).mean()


def _modality_rows(
    layout: BatchLayout | None, modalities: torch.Tensor, code: int
) -> slice | torch.Tensor | None:
    """Rows of modality ``code``: the layout's half (a slice: no host sync), else a mask, or
    ``None`` when the batch has none (reading the mask syncs)."""
    if layout is not None:
        half = code ^ int(layout.infrared_first)
        size = layout.rows // 2
        return slice(half * size, (half + 1) * size)
    rows = modalities == code
    return rows if bool(rows.any()) else None


def _triplet(
    kind: str,
    x: torch.Tensor,
    y: torch.Tensor,
    margin: float | None,
    backend: str,
    wrt_form: str = "official",
):
    if kind == "wrt":
        return weighted_regularized_triplet(x, y, backend, wrt_form)
    return batch_hard_triplet(x, y, margin, backend)


class EMIFLoss(nn.Module):
    """EMIF reconstruction loss; returns the weighted terms ``id``, ``triplet``, ``branch_id``,
    ``intra`` (both summed over the two modalities) and ``dist`` (``beta * L_dist``).

    Guessed choices (switches; methods.md 4.2 [I]):

    * ``beta`` (0.5; methods.md suggests sweeping {0.1, 0.5, 1}): weight of ``L_dist``.
    * ``divergence`` (``"w2"`` | ``"kl"``), ``dist_scope`` (``"batch"`` | ``"identity"``),
      ``dist_reduction`` (``"mean"`` | ``"sum"`` over dimensions), ``var_eps``.
    * ``dist_feature`` (``"bn_features"`` | ``"features"``): which shared feature is aligned
      (BN features are batch-standardised, so the Gaussian fit is better conditioned).
    * ``triplet`` (``"wrt"`` | ``"hard"`` | ``"none"``) on the shared pre-BN feature.
    * ``intra`` (``"hard"`` | ``"wrt"`` | ``"none"``) with ``intra_margin``: the intra-modality
      metric loss on each branch's pre-BN features, over that modality's samples only.
    * ``id_weight``, ``triplet_weight``, ``branch_id_weight``, ``intra_weight`` (all 1.0).
    * ``wrt_form`` (``"official"`` | ``"exact"``) for every WRT term: the weights as AGW's
      released code computes them (EMIF is built on AGW) or exact softmaxes.

    ``batch_layout``: the sampler's :class:`reid_kernels.BatchLayout` of every batch (the
    trainer passes it, not a config key); checked on the first batch, then the per-modality
    terms and ``L_dist`` run without host syncs. ``None``: arbitrary batches.
    """

    def __init__(
        self,
        beta: float = 0.5,
        divergence: str = "w2",
        dist_scope: str = "batch",
        dist_reduction: str = "mean",
        dist_feature: str = "bn_features",
        var_eps: float = 1e-5,
        triplet: str = "wrt",
        triplet_margin: float | None = 0.3,
        intra: str = "hard",
        intra_margin: float | None = 0.3,
        id_weight: float = 1.0,
        triplet_weight: float = 1.0,
        branch_id_weight: float = 1.0,
        intra_weight: float = 1.0,
        label_smoothing: float = 0.0,
        kernels: str = "auto",
        wrt_form: str = "official",
        batch_layout: BatchLayout | None = None,
    ) -> None:
        super().__init__()
        self.wrt_form = check_wrt_form(wrt_form)
        checks = {
            "divergence": (divergence, _DIVERGENCES),
            "dist_scope": (dist_scope, _SCOPES),
            "dist_reduction": (dist_reduction, ("mean", "sum")),
            "dist_feature": (dist_feature, ("bn_features", "features")),
            "triplet": (triplet, ("wrt", "hard", "none")),
            "intra": (intra, ("hard", "wrt", "none")),
        }
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"loss.options.{key} must be one of {allowed}, got {value!r}")
        if beta < 0 or var_eps <= 0:
            raise ValueError(
                f"loss.options.beta must be >= 0 and var_eps > 0, got {beta} and {var_eps}"
            )
        self.beta = beta
        self.divergence = divergence
        self.dist_scope = dist_scope
        self.dist_reduction = dist_reduction
        self.dist_feature = dist_feature
        self.var_eps = var_eps
        self.triplet = triplet
        self.triplet_margin = triplet_margin
        self.intra = intra
        self.intra_margin = intra_margin
        self.id_weight = id_weight
        self.triplet_weight = triplet_weight
        self.branch_id_weight = branch_id_weight
        self.intra_weight = intra_weight
        self.label_smoothing = label_smoothing
        self.kernels = kernels
        # Checked against the first batch (one sync), then trusted, as ICRE does.
        self.batch_layout = batch_layout
        self._layout_checked = False

    @property
    def required_outputs(self) -> tuple[str, ...]:
        keys = ["logits", "branch_logits", self.dist_feature]
        keys += ["features"] if self.triplet != "none" else []
        keys += ["branch_features"] if self.intra != "none" else []
        return tuple(dict.fromkeys(keys))

    def forward(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, modalities: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        ls = self.label_smoothing
        layout = self.batch_layout
        if layout is not None and not self._layout_checked:
            check_layout(labels, modalities, layout)
            self._layout_checked = True
        terms = {"id": self.id_weight * identity_loss(outputs["logits"], labels, ls)}
        if self.triplet != "none":
            tri = _triplet(
                self.triplet,
                outputs["features"],
                labels,
                self.triplet_margin,
                self.kernels,
                self.wrt_form,
            )
            terms["triplet"] = self.triplet_weight * tri
        branch_id = outputs["branch_logits"].sum() * 0.0
        intra = branch_id.clone()
        for code in (0, 1):
            rows = _modality_rows(layout, modalities, code)
            if rows is None:
                continue
            branch_id = branch_id + identity_loss(outputs["branch_logits"][rows], labels[rows], ls)
            if self.intra != "none":
                intra = intra + _triplet(
                    self.intra,
                    outputs["branch_features"][rows],
                    labels[rows],
                    self.intra_margin,
                    self.kernels,
                    self.wrt_form,
                )
        terms["branch_id"] = self.branch_id_weight * branch_id
        if self.intra != "none":
            terms["intra"] = self.intra_weight * intra
        dist = distribution_consistency(
            outputs[self.dist_feature].float(),
            labels,
            modalities,
            self.divergence,
            self.dist_scope,
            self.dist_reduction,
            self.var_eps,
            self.kernels,
            layout,
        )
        terms["dist"] = self.beta * dist
        return terms
