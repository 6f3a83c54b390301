"""AGW loss terms against hand-written formulas; the learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reid_kernels import triplet_mining_loss_reference

from dist_reid.engine.schedules import step_factor
from dist_reid.losses import create_loss


def _wrt_by_hand(x: torch.Tensor, labels: list[int]) -> float:
    """mean_i log(1 + exp(sum_p w+ d - sum_n w- d)), w+ = softmax(d) over positives (self too),
    w- = softmax(-d) over negatives, Euclidean d — written out with loops."""
    n = len(labels)
    d = [
        [
            math.sqrt(max(sum((a - b) ** 2 for a, b in zip(x[i], x[j], strict=True)), 1e-12))
            for j in range(n)
        ]
        for i in range(n)
    ]
    total = 0.0
    for i in range(n):
        pos = [d[i][j] for j in range(n) if labels[j] == labels[i]]
        neg = [d[i][j] for j in range(n) if labels[j] != labels[i]]
        zp = sum(math.exp(v) for v in pos)
        zn = sum(math.exp(-v) for v in neg)
        dp = sum(math.exp(v) / zp * v for v in pos)
        dn = sum(math.exp(-v) / zn * v for v in neg)
        total += math.log1p(math.exp(dp - dn))
    return total / n


def test_agw_loss_is_cross_entropy_plus_wrt():
    torch.manual_seed(1)
    x = torch.randn(6, 4, dtype=torch.float64)
    labels = [0, 0, 1, 1, 2, 2]
    logits = torch.randn(6, 3, dtype=torch.float64)
    terms = create_loss("agw", kernels="torch", wrt_form="exact")(
        {"features": x, "logits": logits}, torch.tensor(labels), torch.zeros(6)
    )
    ce = -sum(torch.log_softmax(logits[i], 0)[c] for i, c in enumerate(labels)) / 6
    assert float(terms["id"]) == pytest.approx(float(ce), rel=1e-6)
    assert float(terms["wrt"]) == pytest.approx(_wrt_by_hand(x.tolist(), labels), rel=1e-5)


def _released_wrt_by_hand(x: list[list[float]], labels: list[int]) -> float:
    """The released WRT's weights with loops: positives shifted by their largest distance,
    negatives by 0 (the masked entries' value), 1e-6 added to both denominators."""
    n = len(labels)
    total = 0.0
    for i in range(n):
        d = [
            math.sqrt(max(sum((a - b) ** 2 for a, b in zip(x[i], x[j], strict=True)), 1e-12))
            for j in range(n)
        ]
        d[i] = 1e-6
        pos = [d[j] for j in range(n) if labels[j] == labels[i]]
        neg = [d[j] for j in range(n) if labels[j] != labels[i]]
        m = max(pos)
        zp = sum(math.exp(v - m) for v in pos) + 1e-6
        zn = sum(math.exp(-v) for v in neg) + 1e-6
        dp = sum(math.exp(v - m) / zp * v for v in pos)
        dn = sum(math.exp(-v) / zn * v for v in neg)
        total += math.log1p(math.exp(dp - dn))
    return total / n


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_agw_wrt_defaults_to_the_released_form(scale):
    """Far apart (mean distance ~30) the released negative term collapses: the default differs
    from the exact softmax by far more than rounding, and matches the released formula."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((12, 6)) * scale / math.sqrt(12))
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    outputs = {"features": x, "logits": torch.zeros(12, 4, dtype=torch.float64)}
    args = (torch.tensor(labels), torch.zeros(12))
    default = float(create_loss("agw", kernels="torch")(outputs, *args)["wrt"])
    exact = float(create_loss("agw", kernels="torch", wrt_form="exact")(outputs, *args)["wrt"])
    # the losses compute in fp32
    assert default == pytest.approx(_released_wrt_by_hand(x.tolist(), labels), rel=1e-6)
    assert exact == pytest.approx(_wrt_by_hand(x.tolist(), labels), rel=1e-6)
    if scale > 10:
        assert default > exact + 5.0  # d_an ~ 0 instead of ~ the nearest negative


def test_icre_and_emif_wrt_use_the_form():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((8, 5)) * 8.0)
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    modalities = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    outputs = {
        "features": x,
        "bn_features": x,
        "logits": torch.zeros(8, 2, dtype=torch.float64),
        "branch_features": x,
        "branch_logits": torch.zeros(8, 2, dtype=torch.float64),
    }
    for form in ("official", "exact"):
        want = float(triplet_mining_loss_reference(x, labels, None, "weighted", form))
        icre = create_loss("icre", triplet="wrt", wrt_form=form, kernels="torch")
        emif = create_loss("emif", wrt_form=form, kernels="torch")
        got_icre = float(icre(outputs, labels, modalities)["triplet"])
        got_emif = float(emif(outputs, labels, modalities)["triplet"])
        assert got_icre == pytest.approx(want, rel=1e-6)
        assert got_emif == pytest.approx(want, rel=1e-6)
    assert create_loss("emif").wrt_form == create_loss("icre").wrt_form == "official"


@pytest.mark.parametrize("name", ["agw", "icre", "emif"])
def test_unknown_wrt_form_is_refused(name):
    with pytest.raises(ValueError, match=r"loss\.options\.wrt_form"):
        create_loss(name, wrt_form="softmax")


def test_batch_hard_triplet_by_hand():
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    terms = create_loss("agw", triplet="hard", margin=0.3, kernels="torch")(
        {"features": x, "logits": torch.zeros(4, 2)}, labels, torch.zeros(4)
    )
    # anchor 0: d_ap=3 (to 1), d_an=1 (to 2) -> 2.3; anchor 1: d_ap=3, d_an=sqrt(10) -> 0.3-0.162;
    # anchor 2: d_ap=4, d_an=1 -> 3.3; anchor 3: d_ap=4, d_an=5 -> 0
    expected = (2.3 + max(0.0, 3 - math.sqrt(10) + 0.3) + 3.3 + 0.0) / 4
    assert float(terms["hard"]) == pytest.approx(expected, rel=1e-5)


def test_unknown_loss_option_is_refused():
    with pytest.raises(ValueError, match="triplet"):
        create_loss("agw", triplet="quadruplet")


@pytest.mark.parametrize(
    "epoch,factor",
    [(0, 0.1), (4, 0.5), (9, 1.0), (19, 1.0), (20, 0.1), (49, 0.1), (50, 0.01), (80, 0.01)],
)
def test_agw_schedule(epoch, factor):
    assert step_factor(epoch, 10, (20, 50), 0.1) == pytest.approx(factor)
