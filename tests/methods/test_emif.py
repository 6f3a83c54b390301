"""EMIF reconstruction: model shapes and switches, hand-computed loss terms, gradcheck, configs,
and a short 2-process training run where the loss falls."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_layout_path_is_sync_free,
    awkward_layouts,
    cuda_syncs_raise,
    loss_terms_and_grads,
    sampler_layout_labels,
    tiny_run_overrides,
)
from reid_kernels import BatchLayout, dispatch

from dist_reid.builders import build_loss, build_model
from dist_reid.config import load_config
from dist_reid.losses import LOSSES
from dist_reid.losses.emif import EMIFLoss, distribution_consistency, gaussian_divergence
from dist_reid.losses.triplet import batch_hard_triplet, weighted_regularized_triplet
from dist_reid.models import MODELS
from dist_reid.models.emif import EMIF

REPO = Path(__file__).resolve().parents[2]
LABELS = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])  # sampler layout: 2 ids x 2, visible then IR
MODS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def _tiny_model(**options) -> EMIF:
    torch.manual_seed(0)
    return EMIF(num_classes=5, backbone="resnet18", **options)


def _images(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 64, 32, generator=torch.Generator().manual_seed(1))


# -- model ---------------------------------------------------------------------------------
def test_registered_by_name():
    assert MODELS.get("emif") is EMIF and LOSSES.get("emif") is EMIFLoss


def test_forward_shapes_and_branch_routing():
    model = _tiny_model()
    out = model(_images(), MODS)
    for key in ("features", "bn_features", "branch_features", "branch_bn_features"):
        assert out[key].shape == (8, 512), key
    assert out["logits"].shape == out["branch_logits"].shape == (8, 5)
    # each row comes from its own modality's branch: perturbing the infrared branch changes
    # only the infrared rows
    with torch.no_grad():
        for p in model.branches[1].parameters():
            p.add_(0.05)
    moved = model(_images(), MODS)
    torch.testing.assert_close(moved["branch_features"][:4], out["branch_features"][:4])
    assert not torch.allclose(moved["branch_features"][4:], out["branch_features"][4:])
    torch.testing.assert_close(moved["features"], out["features"])  # shared head untouched


def test_test_features():
    model = _tiny_model(test_feature="concat", branch="light", branch_dim=16)
    model.eval()
    x = _images(3)
    emb = model.embed(x, "visible")
    assert emb.shape == (3, 512 + 16)
    model.test_feature = "pool"
    pool = model.embed(x, "visible")
    torch.testing.assert_close(emb[:, :512], model.neck.bn(pool))
    out = model(x, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(emb[:, 512:], out["branch_bn_features"])


def test_branch_switch_changes_structure():
    stage4 = _tiny_model()
    light = _tiny_model(branch="light", branch_dim=16)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # light branch: 1x1 conv 512->16 + BN(16) per modality; branch necks: BN(16) + 16x5 each
    light_extra = 2 * (512 * 16 + 2 * 16) + 2 * (2 * 16 + 16 * 5)
    shared = count(light) - light_extra
    stage4_extra = 2 * sum(p.numel() for p in stage4.backbone.stages[3].parameters())
    assert count(stage4) == shared + stage4_extra + 2 * (2 * 512 + 512 * 5)
    assert light(_images(4), torch.tensor([0, 0, 1, 1]))["branch_features"].shape == (4, 16)
    with pytest.raises(ValueError, match="branch"):
        _tiny_model(branch="mlp")
    with pytest.raises(ValueError, match="test_feature"):
        _tiny_model(test_feature="x")


def test_lr_groups_cover_all_parameters_once():
    model = _tiny_model(branch="light", branch_dim=16)
    groups = model.lr_groups()
    ids = [id(p) for params, _ in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    head = {id(p) for p in groups["head"][0]}
    assert all(id(p) in head for p in model.branches.parameters())
    assert groups["backbone"][1] == 0.1


# -- the distribution-consistency loss: hand-computed values --------------------------------
def test_gaussian_divergences_hand_computed():
    mu_a, var_a = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 4.0]])
    mu_b, var_b = torch.tensor([[1.0, 2.0]]), torch.tensor([[4.0, 1.0]])
    # W2: (mu diff)^2 + (sigma diff)^2 per dim: 1 + 1 and 4 + 1
    assert gaussian_divergence(mu_a, var_a, mu_b, var_b, "w2", "sum").item() == pytest.approx(7)
    assert gaussian_divergence(mu_a, var_a, mu_b, var_b, "w2", "mean").item() == pytest.approx(3.5)
    # symmetric KL: 1/2 (1/4 + 4 + 1 * (1 + 1/4) - 2) + 1/2 (4 + 1/4 + 4 * (1/4 + 1) - 2)
    kl = gaussian_divergence(mu_a, var_a, mu_b, var_b, "kl", "sum").item()
    assert kl == pytest.approx(1.75 + 3.625)
    # identical Gaussians: both are 0
    for div in ("w2", "kl"):
        assert gaussian_divergence(mu_a, var_a, mu_a, var_a, div).item() == pytest.approx(0)


def test_distribution_consistency_batch_and_identity_scopes():
    # 1-D features; id 0: visible 0, 2 / infrared 1, 3; id 1: visible 0, 0 / infrared 4, 4
    x = torch.tensor([[0.0], [2.0], [0.0], [0.0], [1.0], [3.0], [4.0], [4.0]])
    eps = 1e-12
    per_id = distribution_consistency(x, LABELS, MODS, "w2", "identity", "sum", eps, "torch")
    # id 0: mu 1 vs 2, sigma 1 vs 1 -> 1; id 1: mu 0 vs 4, sigma 0 vs 0 -> 16
    assert per_id.item() == pytest.approx((1 + 16) / 2, abs=1e-5)
    batch = distribution_consistency(x, LABELS, MODS, "w2", "batch", "sum", eps, "torch")
    # visible 0, 2, 0, 0: mu 0.5, var 0.75; infrared 1, 3, 4, 4: mu 3, var 1.5 (biased)
    expected = 2.5**2 + (math.sqrt(0.75) - math.sqrt(1.5)) ** 2
    assert batch.item() == pytest.approx(expected, abs=1e-5)
    kl = distribution_consistency(x, LABELS, MODS, "kl", "batch", "sum", eps, "torch")
    kl_ref = 0.5 * (0.75 / 1.5 + 1.5 / 0.75 + 2.5**2 * (1 / 0.75 + 1 / 1.5) - 2)
    assert kl.item() == pytest.approx(kl_ref, rel=1e-5)


def test_distribution_consistency_one_modality_is_zero():
    x = torch.randn(4, 3, requires_grad=True)
    out = distribution_consistency(x, LABELS[:4], MODS[:4], backend="torch")
    assert out.item() == 0.0
    out.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("divergence", ["w2", "kl"])
@pytest.mark.parametrize("scope", ["batch", "identity"])
def test_distribution_consistency_gradcheck_float64(divergence, scope):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, dtype=torch.float64, generator=g).requires_grad_()

    def fn(f):
        return distribution_consistency(f, LABELS, MODS, divergence, scope, "mean", 1e-3, "torch")

    assert fn(x).item() > 0
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)


# -- the full loss ---------------------------------------------------------------------------
def _outputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "features": torch.randn(8, 6, generator=g).abs(),
        "bn_features": torch.randn(8, 6, generator=g),
        "logits": torch.randn(8, 3, generator=g),
        "branch_features": torch.randn(8, 6, generator=g),
        "branch_bn_features": torch.randn(8, 6, generator=g),
        "branch_logits": torch.randn(8, 3, generator=g),
    }


def test_loss_terms_match_their_formulas():
    out = _outputs()
    terms = EMIFLoss(kernels="torch")(out, LABELS, MODS)
    assert set(terms) == {"id", "triplet", "branch_id", "intra", "dist"}
    torch.testing.assert_close(terms["id"], F.cross_entropy(out["logits"], LABELS))
    torch.testing.assert_close(
        terms["triplet"], weighted_regularized_triplet(out["features"], LABELS, "torch")
    )
    v, r = MODS == 0, MODS == 1
    branch_ce = F.cross_entropy(out["branch_logits"][v], LABELS[v]) + F.cross_entropy(
        out["branch_logits"][r], LABELS[r]
    )
    torch.testing.assert_close(terms["branch_id"], branch_ce)
    intra = batch_hard_triplet(out["branch_features"][v], LABELS[v], 0.3, "torch")
    intra = intra + batch_hard_triplet(out["branch_features"][r], LABELS[r], 0.3, "torch")
    torch.testing.assert_close(terms["intra"], intra)
    dist = distribution_consistency(out["bn_features"], LABELS, MODS, backend="torch")
    torch.testing.assert_close(terms["dist"], 0.5 * dist)


def test_loss_switches():
    out = _outputs()
    base = EMIFLoss(kernels="torch")(out, LABELS, MODS)
    doubled = EMIFLoss(beta=1.0, kernels="torch")(out, LABELS, MODS)
    torch.testing.assert_close(doubled["dist"], 2 * base["dist"])
    kl = EMIFLoss(divergence="kl", kernels="torch")(out, LABELS, MODS)["dist"]
    ident = EMIFLoss(dist_scope="identity", kernels="torch")(out, LABELS, MODS)["dist"]
    summed = EMIFLoss(dist_reduction="sum", kernels="torch")(out, LABELS, MODS)["dist"]
    assert len({round(t.item(), 6) for t in (base["dist"], kl, ident)}) == 3
    torch.testing.assert_close(summed, 6 * base["dist"])  # D = 6
    raw = EMIFLoss(dist_feature="features", kernels="torch")(out, LABELS, MODS)["dist"]
    ref = distribution_consistency(out["features"], LABELS, MODS, backend="torch")
    torch.testing.assert_close(raw, 0.5 * ref)
    bare = EMIFLoss(triplet="none", intra="none", kernels="torch")(out, LABELS, MODS)
    assert set(bare) == {"id", "branch_id", "dist"}
    hard = EMIFLoss(triplet="hard", intra="wrt", kernels="torch")(out, LABELS, MODS)
    torch.testing.assert_close(
        hard["triplet"], batch_hard_triplet(out["features"], LABELS, 0.3, "torch")
    )
    for key, value in (("divergence", "js"), ("dist_scope", "camera"), ("intra", "center")):
        with pytest.raises(ValueError, match=key):
            EMIFLoss(**{key: value})


# -- the sampler's layout: the same terms without host syncs --------------------------------
LAYOUTS = awkward_layouts()


def _layout_outputs(layout: BatchLayout, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(layout.rows)
    n, d = layout.rows, 6
    return {
        "features": torch.randn(n, d, generator=g, dtype=dtype).abs(),
        "bn_features": torch.randn(n, d, generator=g, dtype=dtype),
        "logits": torch.randn(n, 60, generator=g, dtype=dtype),
        "branch_features": torch.randn(n, d, generator=g, dtype=dtype),
        "branch_logits": torch.randn(n, 60, generator=g, dtype=dtype),
    }


@pytest.mark.parametrize("divergence", ["w2", "kl"])
@pytest.mark.parametrize("scope", ["batch", "identity"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_distribution_consistency_layout_equals_the_general_path(layout, scope, divergence):
    """Float64 values and gradients; identities in slot order only permute the mean's terms."""
    labels, mods = sampler_layout_labels(layout, seed=layout.rows)
    x = _layout_outputs(layout)["bn_features"]
    results = []
    for lay in (None, layout):
        xi = x.clone().requires_grad_()
        value = distribution_consistency(
            xi, labels, mods, divergence, scope, "mean", 1e-3, "torch", layout=lay
        )
        value.backward()
        results.append((value, xi.grad))
    assert results[0][0] > 0
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


@pytest.mark.parametrize(
    "options",
    [{}, {"triplet": "hard", "intra": "wrt", "dist_scope": "identity", "divergence": "kl"}],
    ids=["default", "switched"],
)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_sampler_layout_gives_the_same_terms_and_gradients(layout, options):
    labels, mods = sampler_layout_labels(layout, seed=layout.rows)
    outputs = _layout_outputs(layout)
    want, want_grads = loss_terms_and_grads(
        EMIFLoss(kernels="torch", **options), outputs, labels, mods
    )
    got, got_grads = loss_terms_and_grads(
        EMIFLoss(kernels="torch", batch_layout=layout, **options), outputs, labels, mods
    )
    assert got.keys() == want.keys() == {"id", "triplet", "branch_id", "intra", "dist"}
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key)
    for key in want_grads:
        torch.testing.assert_close(got_grads[key], want_grads[key], msg=key)


def test_sampler_layout_refuses_a_batch_that_breaks_it():
    layout = BatchLayout(2, 2)
    outputs = _layout_outputs(layout)
    with pytest.raises(ValueError, match="layout"):  # checked on the first batch
        EMIFLoss(kernels="torch", batch_layout=layout)(outputs, LABELS, 1 - MODS)
    with pytest.raises(ValueError, match="layout"):
        distribution_consistency(outputs["features"][:6], LABELS[:6], MODS[:6], layout=layout)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sampler_layout_reads_no_value_on_the_host(backend):
    """The CPU stand-in for "no host sync": after the first (checked) batch, the whole loss,
    forward and backward, calls none of the ops that sync on a GPU; without the layout it does."""
    if backend == "triton" and not dispatch.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 was not set before import")
    layout = BatchLayout(3, 2, infrared_first=True)
    labels, mods = sampler_layout_labels(layout)
    outputs = _layout_outputs(layout, dtype=torch.float32)
    for options in ({}, {"triplet": "hard", "intra": "wrt", "dist_scope": "identity"}):
        assert_layout_path_is_sync_free(
            EMIFLoss(kernels=backend, batch_layout=layout, **options),
            EMIFLoss(kernels=backend),
            outputs,
            labels,
            mods,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("scope", ["batch", "identity"])
def test_cuda_layout_path_has_no_host_sync_and_matches(scope):
    layout = BatchLayout(8, 4)
    labels, mods = (t.cuda() for t in sampler_layout_labels(layout))
    outputs = {k: v.cuda() for k, v in _layout_outputs(layout, dtype=torch.float32).items()}
    loss = EMIFLoss(kernels="auto", batch_layout=layout, dist_scope=scope)
    loss_terms_and_grads(loss, outputs, labels, mods)  # checks the layout and compiles the kernels
    with cuda_syncs_raise():
        terms, grads = loss_terms_and_grads(loss, outputs, labels, mods)
    want, want_grads = loss_terms_and_grads(
        EMIFLoss(kernels="torch", dist_scope=scope), outputs, labels, mods
    )
    for key in want:
        torch.testing.assert_close(terms[key], want[key], rtol=1e-4, atol=1e-4, msg=key)
    for key in want_grads:
        torch.testing.assert_close(grads[key], want_grads[key], rtol=1e-4, atol=1e-4, msg=key)


# -- configs -------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["sysu", "regdb", "llcm"])
def test_configs_build(dataset):
    cfg = load_config(
        str(REPO / f"configs/{dataset}/emif.yaml"),
        [
            "model.backbone=resnet18",
            "model.pretrained=null",
            "loss.options.divergence=kl",
            "loss.options.beta=0.1",
        ],
    )
    assert cfg.data.dataset == dataset and cfg.run.name == f"{dataset}_emif"
    loss = build_loss(cfg)
    assert isinstance(loss, EMIFLoss) and (loss.divergence, loss.beta) == ("kl", 0.1)
    assert isinstance(build_model(cfg, num_classes=7), EMIF)


# -- 2-process training --------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_training_loss_falls(synthetic_trees, tmp_path, two_process_probe):
    root, _ = synthetic_trees["sysu"]
    overrides = tiny_run_overrides(
        root,
        tmp_path,
        "emif",
        "model.backbone=resnet18",
        "model.options.branch=light",
        "model.options.branch_dim=64",
        "optim.name=adamw",
        "optim.warmup_epochs=0",
        "optim.lr_mults={backbone: 1.0}",
        "train.lr=0.0005",
        eval_subset=False,
    )
    two_process_probe(str(REPO / "configs/sysu/emif.yaml"), 10, overrides)  # in sync, loss falls
