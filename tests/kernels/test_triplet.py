"""triplet_mining_loss (hard and weighted): backends vs the float64 reference, degenerate
anchors, ties, duplicated rows, half inputs; NaN-poisoned buffers throughout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reid_kernels import dispatch, triplet_mining_loss, triplet_mining_loss_reference

BACKENDS = ("triton", "torch")
MARGINS = (0.3, None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _poison_and_seed(monkeypatch):
    monkeypatch.setenv(dispatch.POISON_ENV, "1")
    torch.manual_seed(4321)


def _skip_unless_runnable(backend: str, device: str = "cpu") -> None:
    if backend == "triton" and device == "cpu" and not dispatch.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 was not set before import")
    if backend == "triton" and device == "cuda" and dispatch.INTERPRET:
        pytest.skip("compiled kernels: run the GPU tests with TRITON_INTERPRET=0")


def _labels(
    n: int, num_ids: int, device: str = "cpu", gen: torch.Generator | None = None
) -> torch.Tensor:
    # Sparse, non-contiguous identity values (like dataset ids), every id used when n allows.
    base = torch.arange(n) % num_ids
    return (base[torch.randperm(n, generator=gen)] * 7 + 3).to(device)


def _compare(
    x64: torch.Tensor,
    labels: torch.Tensor,
    margin,
    mode: str,
    backend: str,
    dtype: torch.dtype = torch.float32,
    grad_scale: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    grad_tol: float = 1e-5,
    wrt_form: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Value and gradient of one backend vs the float64 reference on the same (rounded) inputs."""
    x64 = x64.to(dtype).double().requires_grad_()
    ref = triplet_mining_loss_reference(x64, labels, margin, mode, wrt_form)
    ref_grad = (
        torch.autograd.grad(ref * grad_scale, x64, allow_unused=True)[0]
        if ref.requires_grad
        else None
    )
    if ref_grad is None:
        ref_grad = torch.zeros_like(x64)
    x = x64.detach().to(dtype).requires_grad_()
    out = triplet_mining_loss(
        x, labels, margin=margin, mode=mode, backend=backend, wrt_form=wrt_form
    )
    assert out.shape == () and out.dtype == torch.float32
    (out * grad_scale).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=grad_tol, atol=grad_tol)
    return out, x.grad


CASES = [(1, 1, 5), (8, 1, 12), (6, 6, 9), (37, 5, 23), (70, 9, 40), (64, 8, 32), (33, 2, 17)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("mode", ["hard", "weighted"])
@pytest.mark.parametrize("n, num_ids, d", CASES)
def test_matches_float64_reference(n, num_ids, d, mode, margin, backend):
    _skip_unless_runnable(backend)
    x = torch.randn(n, d, dtype=torch.float64)
    # grad_scale != 1 checks that the upstream gradient is applied (Liger's "not last layer").
    _compare(x, _labels(n, num_ids), margin, mode, backend, grad_scale=1.7)


@pytest.mark.parametrize("mode", ["hard", "weighted"])
def test_reference_gradcheck(mode):
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])
    for margin in (0.3, None, 10.0):
        assert torch.autograd.gradcheck(
            lambda t, m=margin: triplet_mining_loss_reference(t, labels, m, mode), (x,)
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["hard", "weighted"])
def test_one_identity_gives_exact_zero(backend, mode):
    _skip_unless_runnable(backend)
    for n in (1, 5):
        x = torch.randn(n, 7, requires_grad=True)
        loss = triplet_mining_loss(x, torch.full((n,), 4), margin=0.3, mode=mode, backend=backend)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("margin", MARGINS)
def test_singleton_anchors_use_self_as_positive(backend, margin):
    """No positive but itself: d_ap = sqrt(1e-12) and the anchor still counts in the mean."""
    _skip_unless_runnable(backend)
    x = torch.randn(5, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4])
    dist = torch.cdist(x, x)
    off = dist + torch.eye(5) * 1e9
    w_n = torch.softmax(-off, dim=1)  # weighted mode: softmax(-d) over the other 4 rows
    for mode, d_an in (("hard", off.min(dim=1).values), ("weighted", (w_n * dist).sum(1))):
        z = 1e-6 - d_an
        want = (F.softplus(z) if margin is None else F.relu(z + margin)).mean()
        got = triplet_mining_loss(x.float(), labels, margin=margin, mode=mode, backend=backend)
        assert abs(got.item() - want.item()) < 1e-5 * max(1.0, abs(want.item()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["hard", "weighted"])
def test_exact_ties_pick_the_lowest_index(backend, mode):
    """Integer features make every distance exact in fp32: kernel and reference see the same
    ties and must resolve them the same way (lowest column), so gradients agree exactly."""
    _skip_unless_runnable(backend)
    x = torch.tensor(
        [[0, 0], [3, 4], [0, 0], [-3, 4], [3, -4], [0, 5], [5, 0], [0, 0]], dtype=torch.float64
    )
    labels = torch.tensor([0, 0, 1, 0, 1, 1, 0, 1])
    out, _ = _compare(x, labels, 0.3, mode, backend)
    assert out > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["hard", "weighted"])
def test_duplicated_rows(backend, mode):
    """Distinct rows at zero distance (a positive and a negative duplicate)."""
    _skip_unless_runnable(backend)
    x = torch.randn(21, 11, dtype=torch.float64)
    labels = _labels(21, 4)
    same = (labels == labels[0]).nonzero().flatten()
    other = (labels != labels[0]).nonzero().flatten()
    x[same[1]] = x[same[0]]
    x[other[0]] = x[same[0]]
    # The kernel's d at a duplicate is sqrt(noise) ~ 1e-3 vs 1e-6 in float64: loosen accordingly.
    _compare(x, labels, 0.3, mode, backend, rtol=2e-3, atol=2e-3, grad_tol=2e-3)


@pytest.mark.parametrize("mode", ["hard", "weighted"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(mode, dtype):
    _skip_unless_runnable("triton")
    x = torch.randn(45, 33, dtype=torch.float64)
    labels = _labels(45, 6)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    # Same rounded inputs: fp32 accuracy on the value, the dtype's on the (cast) gradient.
    _compare(x, labels, None, mode, "triton", dtype=dtype, grad_tol=tol)
    # Unrounded inputs: within the dtype's tolerance.
    got = triplet_mining_loss(x.to(dtype), labels, margin=None, mode=mode, backend="triton")
    want = triplet_mining_loss_reference(x, labels, None, mode)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("margin", MARGINS)
def test_hard_backward_deterministic_path(margin):
    """Under torch.use_deterministic_algorithms the hard backward switches from the atomic
    scatter kernel to index_add_; both must give the reference gradient."""
    _skip_unless_runnable("triton")
    x = torch.randn(53, 19, dtype=torch.float64)
    labels = _labels(53, 7)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        _, grad_det = _compare(x, labels, margin, "hard", "triton", grad_scale=0.6)
    finally:
        torch.use_deterministic_algorithms(previous)
    _, grad_atomic = _compare(x, labels, margin, "hard", "triton", grad_scale=0.6)
    torch.testing.assert_close(grad_det, grad_atomic, rtol=1e-6, atol=1e-7)


def test_weighted_matches_agw_formula():
    """margin=None weighted mode is AGW's WRT (methods.md 0.3), written out independently."""
    x = torch.randn(24, 10, dtype=torch.float64)
    labels = _labels(24, 4)
    dist = torch.cdist(x, x)
    pos = (labels[:, None] == labels[None, :]).double()
    neg = 1.0 - pos
    w_p = torch.exp(dist) * pos / (torch.exp(dist) * pos).sum(1, keepdim=True)
    w_n = torch.exp(-dist) * neg / (torch.exp(-dist) * neg).sum(1, keepdim=True)
    want = torch.log1p(torch.exp((w_p * dist).sum(1) - (w_n * dist).sum(1))).mean()
    for backend in BACKENDS:
        if backend == "triton" and not dispatch.INTERPRET:
            continue
        got = triplet_mining_loss(x.float(), labels, margin=None, mode="weighted", backend=backend)
        assert abs(got.item() - want.item()) < 1e-5


def test_hard_matches_batch_hard_formula():
    x = torch.randn(30, 12, dtype=torch.float64)
    labels = _labels(30, 5)
    dist = torch.cdist(x, x)
    pos = labels[:, None] == labels[None, :]
    d_ap = torch.where(pos, dist, torch.zeros_like(dist)).max(1).values
    d_an = torch.where(pos, torch.full_like(dist, 1e9), dist).min(1).values
    want = F.relu(d_ap - d_an + 0.3).mean()
    got = triplet_mining_loss_reference(x, labels, 0.3, "hard")
    assert abs(got.item() - want.item()) < 1e-9


def test_rejects_bad_arguments():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="mode"):
        triplet_mining_loss(x, torch.zeros(4, dtype=torch.long), mode="semi-hard")
    with pytest.raises(ValueError, match="labels"):
        triplet_mining_loss(x, torch.zeros(3, dtype=torch.long))


def test_no_pairwise_matrix_saved_for_backward():
    if not dispatch.INTERPRET:
        pytest.skip("needs the interpreter")
    x = torch.randn(40, 8, requires_grad=True)
    saved = []
    for mode, form in (("hard", "exact"), ("weighted", "exact"), ("weighted", "official")):
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(tuple(t.shape)) or t, lambda t: t
        ):
            triplet_mining_loss(x, _labels(40, 4), mode=mode, backend="triton", wrt_form=form)
    assert saved and all(s != (40, 40) for s in saved)


@pytest.mark.skipif(not dispatch.INTERPRET, reason="TRITON_INTERPRET=1 was not set before import")
@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,  # same examples on every CI run
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    n=st.integers(1, 70),
    num_ids=st.integers(1, 12),
    d=st.integers(1, 40),
    mode=st.sampled_from(["hard", "weighted"]),
    margin=st.sampled_from([0.3, None, 2.0]),
    seed=st.integers(0, 2**31 - 1),
    form=st.sampled_from(["exact", "official"]),
)
def test_random_batches_property(n, num_ids, d, mode, margin, seed, form):
    gen = torch.Generator().manual_seed(seed)  # inputs replay exactly when hypothesis shrinks
    x = torch.randn(n, d, dtype=torch.float64, generator=gen)
    labels = _labels(n, num_ids, gen=gen)
    # In few dimensions rows can nearly coincide; the fp32 expansion then gives d a relative
    # error ~ eps * |x|^2 / d^2 (pairwise.py). Widen the tolerances by that bound.
    scale = 2 * float((x * x).sum(1).max()) if n else 0.0
    dist = torch.cdist(x, x) + torch.eye(n, dtype=torch.float64) * 1e9
    d_min = float(dist.min()) if n > 1 else 1.0
    atol = 1e-5 + 1e-6 * scale / d_min
    grad_tol = 1e-5 + 1e-6 * scale / d_min**2 / max(n, 1)
    _compare(x, labels, margin, mode, "triton", atol=atol, grad_tol=grad_tol, wrt_form=form)


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["hard", "weighted"])
@pytest.mark.parametrize(
    "n, num_ids, d", [(1, 1, 8), (6, 6, 9), (70, 9, 40), (64, 8, 2048), (300, 37, 768)]
)
def test_gpu_matches_reference(n, num_ids, d, mode, dtype):
    _skip_unless_runnable("triton", "cuda")
    x = torch.randn(n, d, dtype=torch.float64, device="cuda")
    labels = _labels(n, num_ids, "cuda")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for margin in MARGINS:
        _compare(x, labels, margin, mode, "auto", dtype=dtype, rtol=1e-4, atol=1e-4, grad_tol=tol)


# ------------------------------------------------------------------------- WRT: both forms
FORMS = ("exact", "official")


def _scaled(seed: int, n: int, d: int, p: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """numpy default_rng(seed) features whose mean pairwise distance is ~ ``scale`` (pre-BN AGW
    features reach 20-30) and ``n`` labels cycling over ``p`` identities, shuffled."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * (scale / np.sqrt(2 * d))
    return torch.from_numpy(x), torch.from_numpy(rng.permutation(np.arange(n) % p))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 10.0, 30.0])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n, num_ids, d", [(1, 1, 5), (6, 6, 9), (37, 5, 23), (70, 9, 40)])
def test_wrt_forms_match_float64_reference_at_feature_scales(n, num_ids, d, form, scale, backend):
    """Both WRT forms, values and gradients, against the float64 reference at mean pairwise
    distance 1, 10 and 30 (where the official form's negative term has collapsed)."""
    _skip_unless_runnable(backend)
    x = torch.randn(n, d, dtype=torch.float64) * (scale / (2 * d) ** 0.5)
    labels = _labels(n, num_ids)
    x32 = x.float().double().requires_grad_()
    ref = triplet_mining_loss_reference(x32, labels, None, "weighted", form)
    (ref_grad,) = torch.autograd.grad(ref * 1.7, x32)
    xk = x.float().requires_grad_()
    out = triplet_mining_loss(xk, labels, None, "weighted", backend, wrt_form=form)
    (out * 1.7).backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xk.grad.double(), ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_form_with_a_margin(backend):
    """A numeric margin hinges the official weighted distances, like the exact form."""
    _skip_unless_runnable(backend)
    x, labels = _scaled(11, 29, 13, 4, 30.0)
    xr = x.float().double().requires_grad_()
    ref = triplet_mining_loss_reference(xr, labels, 0.3, "weighted", "official")
    (ref_grad,) = torch.autograd.grad(ref, xr)
    xk = x.float().requires_grad_()
    got = triplet_mining_loss(xk, labels, 0.3, "weighted", backend, wrt_form="official")
    got.backward()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xk.grad.double(), ref_grad, rtol=1e-5, atol=1e-5)


# Released figures. AGW's released code (mangye16/Cross-Modal-Re-ID-baseline, loss.py), run
# outside this project with torch 2.14 CPU in float64: TripletLoss_WRT()(x, labels)[0] and the
# gradient of that loss wrt x, on (x, labels) = _scaled(seed, n, d, p, scale) above (numpy
# default_rng(seed): x = standard_normal((n, d)) * scale / sqrt(2 d), then
# labels = permutation(arange(n) % p)). Columns: loss, |grad|, grad[0, 0], grad[-1, -1].
RELEASED_WRT = {
    (0, 24, 16, 4, 1.0): (
        0.6682720256988562,
        0.08179452114415804,
        0.0010866997850171177,
        -0.002143666157505578,
    ),
    (1, 24, 16, 4, 10.0): (
        3.258001091885424,
        0.4069713385910221,
        -0.020861440984441423,
        0.02116951668136402,
    ),
    (2, 24, 16, 4, 30.0): (
        35.052925823543625,
        0.4924835223666731,
        0.009091606679009845,
        -0.027920976877092794,
    ),
    (3, 37, 23, 5, 30.0): (
        34.29975210075615,
        0.3586259155254872,
        0.017670711500521383,
        -0.0005035869262080077,
    ),
    # one identity: no negative anywhere, d_an = 0 and every anchor counts
    (5, 6, 5, 1, 3.0): (
        2.640495060119491,
        0.6863254098406188,
        -0.028676426701680805,
        -0.09834509935246365,
    ),
    # a realistic batch: 8 ids x 8 images, 2048-d (torch backend only: too big for the
    # interpreter)
    (4, 64, 2048, 8, 25.0): (
        25.047243946461883,
        0.20023180531598678,
        -0.00013059699952113805,
        0.0004143602629117014,
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(RELEASED_WRT), ids=str)
def test_official_form_reproduces_the_released_wrt(case, backend):
    _skip_unless_runnable(backend)
    if backend == "triton" and case[2] > 100:
        pytest.skip("2048-d is too slow under the interpreter (the torch backend runs it)")
    loss_want, norm_want, first_want, last_want = RELEASED_WRT[case]
    x, labels = _scaled(*case)
    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = 1e-9 if backend == "torch" else 2e-5
    x = x.to(dtype).requires_grad_()
    loss = triplet_mining_loss(x, labels, None, "weighted", backend, wrt_form="official")
    loss.backward()
    g = x.grad.double()
    assert float(loss.detach()) == pytest.approx(loss_want, rel=tol)
    assert float(g.norm()) == pytest.approx(norm_want, rel=tol)
    assert float(g[0, 0]) == pytest.approx(first_want, rel=10 * tol, abs=tol * norm_want)
    assert float(g[-1, -1]) == pytest.approx(last_want, rel=10 * tol, abs=tol * norm_want)


# Gradient cosine between the released TripletLoss_WRT and an exact-softmax WRT (written
# independently), both float64, on _scaled(seed, 64, 2048, 8, scale) -- computed outside the
# project as above. At mean distance 25-30 the two training signals point ~65 degrees apart.
RELEASED_VS_EXACT_COSINE = {
    (4, 25.0): 0.40412170394136104,
    (6, 30.0): 0.4487998559006346,
    (7, 1.0): 0.9999999999999134,
}


@pytest.mark.parametrize("case", list(RELEASED_VS_EXACT_COSINE), ids=str)
def test_forms_gradient_cosine_matches_the_released_code(case):
    seed, scale = case
    x, labels = _scaled(seed, 64, 2048, 8, scale)
    grads = []
    for form in FORMS:
        xg = x.clone().requires_grad_()
        triplet_mining_loss_reference(xg, labels, None, "weighted", form).backward()
        grads.append(xg.grad.flatten())
    cos = float(F.cosine_similarity(grads[0], grads[1], dim=0))
    assert cos == pytest.approx(RELEASED_VS_EXACT_COSINE[case], abs=1e-9)


def test_official_form_written_out():
    """The official weights by hand: positives shifted by their max, negatives by 0 (the
    masked entries' value), 1e-6 in both denominators; the mean runs over every anchor."""
    x, labels = _scaled(3, 15, 7, 3, 12.0)
    dist = torch.cdist(x, x).fill_diagonal_(1e-6)
    pos = labels[:, None] == labels[None, :]
    e_p = torch.where(pos, torch.exp(dist - torch.where(pos, dist, 0.0).amax(1, keepdim=True)), 0)
    e_n = torch.where(pos, 0.0, torch.exp(-dist))
    d_ap = (e_p * dist).sum(1) / (e_p.sum(1) + 1e-6)
    d_an = (e_n * dist).sum(1) / (e_n.sum(1) + 1e-6)
    want = F.softplus(d_ap - d_an).mean()
    got = triplet_mining_loss_reference(x, labels, None, "weighted", "official")
    assert float(got) == pytest.approx(float(want), rel=1e-12)


def test_official_reference_gradcheck():
    x, labels = _scaled(8, 9, 5, 3, 2.0)
    x = x.requires_grad_()
    for margin in (None, 0.3):
        assert torch.autograd.gradcheck(
            lambda t, m=margin: triplet_mining_loss_reference(t, labels, m, "weighted", "official"),
            (x,),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_form_exact_ties(backend):
    """Integer features: equal farthest positives; the max's gradient goes to the lowest index
    in both the kernel and the reference (torch.max)."""
    _skip_unless_runnable(backend)
    x = torch.tensor(
        [[0, 0], [3, 4], [0, 0], [-3, 4], [3, -4], [0, 5], [5, 0], [0, 0]], dtype=torch.float64
    )
    labels = torch.tensor([0, 0, 1, 0, 1, 1, 0, 1])
    x32 = x.requires_grad_()
    ref = triplet_mining_loss_reference(x32, labels, None, "weighted", "official")
    (ref_grad,) = torch.autograd.grad(ref, x32)
    xk = x.detach().float().requires_grad_()
    out = triplet_mining_loss(xk, labels, None, "weighted", backend, wrt_form="official")
    out.backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xk.grad.double(), ref_grad, rtol=1e-6, atol=1e-6)


def test_rejects_unknown_wrt_form():
    x = torch.randn(4, 3)
    for fn in (triplet_mining_loss, triplet_mining_loss_reference):
        with pytest.raises(ValueError, match="wrt_form"):
            fn(x, torch.zeros(4, dtype=torch.long), None, "weighted", wrt_form="softmax")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 10.0, 30.0])
@pytest.mark.parametrize("n, num_ids, d", [(6, 6, 9), (70, 9, 40), (64, 8, 2048)])
def test_gpu_official_form_matches_reference(n, num_ids, d, scale, dtype):
    _skip_unless_runnable("triton", "cuda")
    x = torch.randn(n, d, dtype=torch.float64, device="cuda") * (scale / (2 * d) ** 0.5)
    labels = _labels(n, num_ids, "cuda")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    xr = x.to(dtype).double().requires_grad_()
    ref = triplet_mining_loss_reference(xr, labels, None, "weighted", "official")
    (ref_grad,) = torch.autograd.grad(ref, xr)
    xk = x.to(dtype).requires_grad_()
    out = triplet_mining_loss(xk, labels, None, "weighted", "auto", wrt_form="official")
    out.backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xk.grad.double(), ref_grad, rtol=tol, atol=tol)
