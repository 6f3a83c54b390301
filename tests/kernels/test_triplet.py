"""triplet_mining_loss (hard and weighted): backends vs the float64 reference, degenerate
anchors, ties, duplicated rows, half inputs; NaN-poisoned buffers throughout."""

from __future__ import annotations

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Value and gradient of one backend vs the float64 reference on the same (rounded) inputs."""
    x64 = x64.to(dtype).double().requires_grad_()
    ref = triplet_mining_loss_reference(x64, labels, margin, mode)
    ref_grad = (
        torch.autograd.grad(ref * grad_scale, x64, allow_unused=True)[0]
        if ref.requires_grad
        else None
    )
    if ref_grad is None:
        ref_grad = torch.zeros_like(x64)
    x = x64.detach().to(dtype).requires_grad_()
    out = triplet_mining_loss(x, labels, margin=margin, mode=mode, backend=backend)
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
    for mode in ("hard", "weighted"):
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(tuple(t.shape)) or t, lambda t: t
        ):
            triplet_mining_loss(x, _labels(40, 4), mode=mode, backend="triton")
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
)
def test_random_batches_property(n, num_ids, d, mode, margin, seed):
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
    _compare(x, labels, margin, mode, "triton", atol=atol, grad_tol=grad_tol)


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
