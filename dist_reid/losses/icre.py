"""ICRE's objective ``L_id + lambda * L_icg`` as a **reconstruction** (methods.md section 3.2).

The paper gives the ICG loss only in words ("modality-aware centers", cross-modal intra-class
compactness, a threshold rho1); the formula below is our candidate, not the paper's:

``L_icg = sample_weight * (1/N') sum_i [ |f_i - c^{other(m_i)}_{y_i}| - rho1 ]_+``
``      + cross_weight  * (1/P2) sum_y |c^v_y - c^r_y|``
``      + sep_weight    * hetero-center triplet over the 2P centers (margin sep_margin)``

``c^m_y`` is the batch mean of identity ``y`` in modality ``m``; ``N'`` counts the samples whose
identity has a center in the other modality (all of them with the cross-modal sampler); ``P2``
the identities with both centers. Centers come from :func:`reid_kernels.segment_mean` and
:func:`reid_kernels.center_losses`, distances from :func:`reid_kernels.pairwise_distance`; all
terms are batch-local (the sampler gives every rank complete identities).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from reid_kernels import (
    BatchLayout,
    batch_identities,
    center_losses,
    check_layout,
    pairwise_distance,
    segment_mean,
)
from torch import nn

from dist_reid.losses.identity import identity_loss
from dist_reid.losses.triplet import (
    batch_hard_triplet,
    check_wrt_form,
    weighted_regularized_triplet,
)

_FEATURES = ("features", "bn_features")


def icg_terms(
    features: torch.Tensor,
    labels: torch.Tensor,
    modalities: torch.Tensor,
    rho1: float,
    sep_margin: float | None = 0.3,
    backend: str = "auto",
    layout: BatchLayout | None = None,
) -> dict[str, torch.Tensor]:
    """The three unweighted ICG terms ``{"sample", "cross", "sep"}`` (module docstring).

    ``features`` (N, D) float (float64 stays float64 on the torch backend, for gradcheck),
    ``labels`` (N,) int, ``modalities`` (N,) int (0 visible, 1 infrared). ``layout``: the batch
    is the sampler's :class:`reid_kernels.BatchLayout`, so nothing syncs with the host.
    """
    if features.dim() != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"features must be (N, D) with N = len(labels), got {tuple(features.shape)}"
        )
    uniq, inv = batch_identities(labels, layout)
    mods = modalities.long()
    seg = inv * 2 + mods
    num = 2 * uniq.shape[0]
    centers = segment_mean(features, seg, num, backend=backend)  # (2P, D), empty rows are 0
    present = (
        torch.zeros(num, dtype=torch.long, device=seg.device).index_add_(
            0, seg, torch.ones_like(seg)
        )
        > 0
    )  # bincount would read the maximum on the host
    other = inv * 2 + (1 - mods)  # the same identity's center in the other modality
    dist = pairwise_distance(features, centers, backend=backend)  # (N, 2P)
    to_other = dist.gather(1, other[:, None]).squeeze(1)
    valid = present[other]
    hinge = F.relu(to_other - rho1)
    sample = (hinge * valid).sum() / valid.sum().clamp_min(1)
    cl = center_losses(
        features,
        labels,
        modalities,
        margin=sep_margin,
        hetero_weight=1.0,
        cross_weight=1.0,
        center_weight=0.0,
        backend=backend,
        layout=layout,
    )
    return {"sample": sample, "cross": cl.cross_modal, "sep": cl.hetero_triplet}


class ICRELoss(nn.Module):
    """``id_weight * CE + lambda_icg * L_icg [+ triplet_weight * triplet]`` (reconstruction).

    Returns the already-weighted terms ``id``, ``icg_sample``, ``icg_cross``, ``icg_sep`` (each
    ICG part carries ``lambda_icg`` and its own weight, so they sum to ``lambda_icg * L_icg``)
    and, when enabled, ``triplet``.

    First-class hyperparameters (swept by dotted key): ``loss.options.lambda_icg`` (lambda,
    default 0.1) and ``loss.options.rho1`` (the sample-to-center threshold, default 0.1 on
    L2-normalised features). Guessed choices (switches):

    * ``icg_feature`` (``"bn_features"`` | ``"features"``): which model output ICG acts on. On
      the normalised pre-BN feature a large shared offset meets the sample and cross terms and
      leaves the separation term at its margin with a vanishing gradient (the classifier reads
      the BN feature, which removes the offset); the BN feature's shift is frozen at zero, so
      no offset can. At lambda 1 on the BN feature ICG overpowers the id loss from random init
      (README, *Every method learns*).
    * ``icg_normalize`` (True): L2-normalise it first, so rho1 is scale-free (distances in
      [0, 2]; methods.md risk 4).
    * ``sample_weight`` / ``cross_weight`` / ``sep_weight`` (1, 1, 1) and ``sep_margin`` (0.3;
      None = soft margin): the three parts of the candidate ICG.
    * ``triplet`` (``"none"`` | ``"wrt"`` | ``"hard"``) with ``triplet_weight`` and
      ``triplet_margin``: the paper names only ID + ICG, so no triplet by default.
    * ``wrt_form`` (``"official"`` | ``"exact"``): the WRT weights, as AGW's released code
      computes them (ICRE is built on AGW) or exact softmaxes.

    ``batch_layout``: the sampler's :class:`reid_kernels.BatchLayout` of every batch (the
    trainer passes it, not a config key); checked on the first batch, then the ICG terms run
    without host syncs. ``None``: arbitrary batches.
    """

    def __init__(
        self,
        lambda_icg: float = 0.1,
        rho1: float = 0.1,
        icg_feature: str = "bn_features",
        icg_normalize: bool = True,
        sample_weight: float = 1.0,
        cross_weight: float = 1.0,
        sep_weight: float = 1.0,
        sep_margin: float | None = 0.3,
        id_weight: float = 1.0,
        label_smoothing: float = 0.0,
        triplet: str = "none",
        triplet_weight: float = 1.0,
        triplet_margin: float | None = 0.3,
        kernels: str = "auto",
        wrt_form: str = "official",
        batch_layout: BatchLayout | None = None,
    ) -> None:
        super().__init__()
        self.wrt_form = check_wrt_form(wrt_form)
        if icg_feature not in _FEATURES:
            raise ValueError(
                f"loss.options.icg_feature must be one of {_FEATURES}, got {icg_feature!r}"
            )
        if triplet not in {"none", "wrt", "hard"}:
            raise ValueError(
                f"loss.options.triplet must be 'none', 'wrt' or 'hard', got {triplet!r}"
            )
        if lambda_icg < 0 or rho1 < 0:
            raise ValueError(
                f"loss.options.lambda_icg and loss.options.rho1 must be >= 0, "
                f"got {lambda_icg} and {rho1}"
            )
        self.lambda_icg = lambda_icg
        self.rho1 = rho1
        self.icg_feature = icg_feature
        self.icg_normalize = icg_normalize
        self.weights = {"sample": sample_weight, "cross": cross_weight, "sep": sep_weight}
        self.sep_margin = sep_margin
        self.id_weight = id_weight
        self.label_smoothing = label_smoothing
        self.triplet = triplet
        self.triplet_weight = triplet_weight
        self.triplet_margin = triplet_margin
        self.kernels = kernels
        # The trainer passes the sampler's layout: the ICG terms then need no host sync. It is
        # checked against the first batch (one sync), then trusted.
        self.batch_layout = batch_layout
        self._layout_checked = False

    @property
    def required_outputs(self) -> tuple[str, ...]:
        triplet = ("features",) if self.triplet != "none" else ()
        return tuple(dict.fromkeys(("logits", self.icg_feature, *triplet)))

    def forward(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, modalities: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        terms = {
            "id": self.id_weight * identity_loss(outputs["logits"], labels, self.label_smoothing)
        }
        feats = outputs[self.icg_feature].float()
        if self.icg_normalize:
            feats = F.normalize(feats, dim=1)
        layout = self.batch_layout
        if layout is not None and not self._layout_checked:
            check_layout(labels, modalities, layout)
            self._layout_checked = True
        icg = icg_terms(feats, labels, modalities, self.rho1, self.sep_margin, self.kernels, layout)
        for name, value in icg.items():
            terms[f"icg_{name}"] = self.lambda_icg * self.weights[name] * value
        if self.triplet == "wrt":
            tri = weighted_regularized_triplet(
                outputs["features"], labels, self.kernels, self.wrt_form
            )
            terms["triplet"] = self.triplet_weight * tri
        elif self.triplet == "hard":
            tri = batch_hard_triplet(outputs["features"], labels, self.triplet_margin, self.kernels)
            terms["triplet"] = self.triplet_weight * tri
        return terms
