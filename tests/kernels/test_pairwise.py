"""pairwise_distance / topk_distances: Triton (interpreter on CPU, compiled on GPU) and torch
backends against a float64 reference, with NaN-poisoned output buffers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import reid_kernels
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reid_kernels import dispatch, pairwise_distance, pairwise_distance_reference, topk_distances
from reid_kernels.pairwise import _PairwiseDistance

BACKENDS = ("triton", "torch")
needs_interp = pytest.mark.skipif(
    not dispatch.INTERPRET, reason="TRITON_INTERPRET=1 was not set before import"
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _poison_and_seed(monkeypatch):
    """Every kernel output buffer starts as NaN, so an unwritten element fails the comparison."""
    monkeypatch.setenv(dispatch.POISON_ENV, "1")
    torch.manual_seed(1234)


def _skip_unless_runnable(backend: str, device: str = "cpu") -> None:
    if backend == "triton" and device == "cpu" and not dispatch.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 was not set before import")
    if backend == "triton" and device == "cuda" and dispatch.INTERPRET:
        pytest.skip("compiled kernels: run the GPU tests with TRITON_INTERPRET=0")


def _tols(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float32: {"rtol": 2e-5, "atol": 2e-5},
        torch.float16: {"rtol": 2e-3, "atol": 2e-3},
        torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
    }[dtype]


def _check_against_reference(
    n: int,
    m: int | None,
    d: int,
    backend: str,
    squared: bool,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    gen: torch.Generator | None = None,
) -> None:
    """Forward and gradients of one backend vs the float64 reference on the same (rounded) inputs."""
    x64 = torch.randn(n, d, dtype=torch.float64, generator=gen).to(device)
    y64 = None if m is None else torch.randn(m, d, dtype=torch.float64, generator=gen).to(device)
    # The reference sees the inputs already rounded to the test dtype: then fp32 math in the
    # kernel should match to fp32 accuracy whatever the input dtype.
    x64 = x64.to(dtype).double().requires_grad_()
    y64 = None if y64 is None else y64.to(dtype).double().requires_grad_()
    ref = pairwise_distance_reference(x64, y64, squared)
    upstream = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(
        (ref * upstream).sum(), [t for t in (x64, y64) if t is not None]
    )

    x = x64.detach().to(dtype).requires_grad_()
    y = None if y64 is None else y64.detach().to(dtype).requires_grad_()
    out = pairwise_distance(x, y, squared=squared, backend=backend)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(
        (out * upstream.float()).sum(), [t for t in (x, y) if t is not None]
    )
    scale = float((x64.detach() ** 2).sum(1).max()) + (
        0.0 if y64 is None else float((y64.detach() ** 2).sum(1).max())
    )
    # Cancellation in |x|^2 + |y|^2 - 2 x.y: absolute error ~ eps32 * scale on s.
    s_atol = 1e-6 * scale
    if squared:
        torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=s_atol)
    else:
        torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=s_atol**0.5)
    # Near-coincident rows make the fp32 expansion ill-conditioned: d carries a relative error
    # ~ eps * scale / d^2 and the backward's rowsum * x - A @ y cancels terms ~ |G| |x| / d.
    # Widen the gradient tolerance by that bound (it vanishes for well-separated rows).
    extra = 0.0
    if not squared:
        dist = ref.detach().clone()
        if y64 is None:
            dist.fill_diagonal_(float("inf"))  # the diagonal has zero gradient by definition
        g = upstream.abs()
        extra = 1e-6 * float(
            (g / dist).sum(1).max() * scale**0.5 + (g / dist**2).sum(1).max() * scale
        )
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == dtype
        tol = _tols(dtype)
        torch.testing.assert_close(
            got.double(), want, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale**0.5) + extra
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize(
    "n, m, d", [(1, 1, 1), (1, 7, 3), (37, 45, 23), (70, 33, 40), (64, 32, 32)]
)
def test_matches_float64_reference(n, m, d, same, squared, backend):
    _skip_unless_runnable(backend)
    _check_against_reference(n, None if same else m, d, backend, squared)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("same", [True, False])
def test_half_inputs(dtype, same):
    _skip_unless_runnable("triton")
    _check_against_reference(29, None if same else 41, 37, "triton", False, dtype=dtype)
    # ... and within the dtype's tolerance of the exact distances of the unrounded inputs.
    x64 = torch.randn(29, 37, dtype=torch.float64)
    y64 = None if same else torch.randn(41, 37, dtype=torch.float64)
    out = pairwise_distance(x64.to(dtype), None if same else y64.to(dtype), backend="triton")
    ref = pairwise_distance_reference(x64, y64)
    torch.testing.assert_close(out.double(), ref, **_tols(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicated_rows_give_zero_distance_and_finite_gradients(backend):
    _skip_unless_runnable(backend)
    x = torch.randn(23, 19)
    x[5] = x[2]
    x[17] = x[2]
    x[22] = x[0]
    x = x.requires_grad_()
    out = pairwise_distance(x, backend=backend)
    noise = (8 * 1.2e-7 * float((x.detach() ** 2).sum(1).max())) ** 0.5
    for i, j in ((5, 2), (17, 2), (22, 0), (3, 3)):
        assert out[i, j] <= noise and out[j, i] <= noise
    assert out.diagonal().eq(1e-6).all()  # exact zero before the clamp on the diagonal
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    ref_x = x.detach().double().requires_grad_()
    pairwise_distance_reference(ref_x).sum().backward()
    # Duplicates: d ~ noise with a gradient of size 1/d times an exact-zero difference.
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("same", [True, False])
def test_reference_gradcheck(same):
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = None if same else torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    inputs = (x,) if same else (x, y)
    for squared in (False, True):

        def fn(*t, squared=squared):
            return pairwise_distance_reference(t[0], t[1] if len(t) == 2 else None, squared)

        assert torch.autograd.gradcheck(fn, inputs)


@needs_interp
@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,  # same examples on every CI run
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    n=st.integers(1, 70),
    m=st.integers(1, 70),
    d=st.integers(1, 40),
    same=st.booleans(),
    squared=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_property(n, m, d, same, squared, seed):
    gen = torch.Generator().manual_seed(seed)  # inputs replay exactly when hypothesis shrinks
    _check_against_reference(n, None if same else m, d, "triton", squared, gen=gen)


@needs_interp
def test_non_contiguous_inputs_and_expanded_grad():
    base = torch.randn(40, 30)
    x = base[::2, ::3].requires_grad_()  # strided view
    y = torch.randn(25, 10).t().contiguous().t()  # column-major
    out = pairwise_distance(x, y, backend="triton")
    out.sum().backward()  # grad_output is an expanded (stride 0) tensor
    xr = x.detach().double().requires_grad_()
    pairwise_distance_reference(xr, y.double()).sum().backward()
    torch.testing.assert_close(
        out.double(),
        pairwise_distance_reference(x.detach().double(), y.double()),
        rtol=1e-5,
        atol=1e-5,
    )
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)


def test_no_matrix_saved_for_backward():
    if not dispatch.INTERPRET:
        pytest.skip("needs the interpreter")
    x = torch.randn(50, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        out = pairwise_distance(x, backend="triton")
    assert out.shape == (50, 50)
    assert all(s != (50, 50) for s in saved) and saved  # only the (50, 8) inputs are kept


# ---------------------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k, chunk", [(1, 7), (5, 64), (13, None), (70, 16)])
def test_topk_matches_full_matrix(backend, k, chunk):
    _skip_unless_runnable(backend)
    q, g = torch.randn(33, 21), torch.randn(70, 21)
    values, idx = topk_distances(q, g, k, backend=backend, chunk_size=chunk)
    full = pairwise_distance_reference(q.double(), g.double())
    ref_v, ref_i = torch.sort(full, dim=1)
    assert values.shape == idx.shape == (33, k) and idx.dtype == torch.int64
    torch.testing.assert_close(values.double(), ref_v[:, :k], rtol=1e-5, atol=1e-5)
    assert torch.equal(idx, ref_i[:, :k])  # continuous data: no ties
    assert bool((values[:, 1:] >= values[:, :-1]).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_ties_and_squared(backend):
    _skip_unless_runnable(backend)
    q = torch.randn(9, 6)
    g = torch.randn(20, 6).repeat(2, 1)  # every gallery row twice: all distances tied in pairs
    values, idx = topk_distances(q, g, 4, squared=True, backend=backend, chunk_size=8)
    torch.testing.assert_close(values[:, 0], values[:, 1])
    assert torch.equal(idx[:, 0] % 20, idx[:, 1] % 20) and bool((idx[:, 0] < idx[:, 1]).all())
    ref = (
        pairwise_distance_reference(q.double(), g.double(), squared=True).sort(dim=1).values[:, :4]
    )
    torch.testing.assert_close(values.double(), ref, rtol=1e-5, atol=1e-5)


def test_topk_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        topk_distances(torch.randn(3, 4), torch.randn(5, 4), 6, backend="torch")


# ------------------------------------------------------------------------------------ dispatch
def test_backend_selection_and_errors(monkeypatch):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        pairwise_distance(x, backend="cuda")
    # auto on CPU never reaches the Triton autograd Function.
    monkeypatch.setattr(
        _PairwiseDistance, "apply", staticmethod(lambda *a: pytest.fail("triton used"))
    )
    assert pairwise_distance(x).shape == (4, 4)
    assert pairwise_distance(x.double()).dtype == torch.float64  # reference keeps float64
    if dispatch.HAS_TRITON:
        with pytest.raises(RuntimeError, match="float64"):
            pairwise_distance(x.double(), backend="triton")
        monkeypatch.setattr(dispatch, "INTERPRET", False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            pairwise_distance(x, backend="triton")


def test_poison_buffers_are_nan():
    buf = dispatch.new_buffer((3, 2), torch.device("cpu"))
    assert torch.isnan(buf).all()
    assert (dispatch.new_buffer((2,), torch.device("cpu"), torch.int32) == -1).all()


def test_import_without_triton():
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # make `import triton` fail
        import torch, reid_kernels
        assert not reid_kernels.HAS_TRITON
        x = torch.randn(5, 3)
        assert reid_kernels.pairwise_distance(x).shape == (5, 5)
        assert reid_kernels.triplet_mining_loss(x, torch.tensor([0, 0, 1, 1, 2])).ndim == 0
        try:
            reid_kernels.pairwise_distance(x, backend="triton")
        except RuntimeError as err:
            assert "pip install" in str(err)
        else:
            raise SystemExit("triton backend did not raise")
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")


def test_public_names():
    for name in ("pairwise_distance", "topk_distances", "triplet_mining_loss", "center_losses"):
        assert callable(getattr(reid_kernels, name))


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("n, m, d", [(1, 1, 1), (37, 45, 23), (130, 257, 200), (512, 300, 2048)])
def test_gpu_matches_reference(n, m, d, same, dtype):
    _skip_unless_runnable("triton", "cuda")
    _check_against_reference(n, None if same else m, d, "triton", False, dtype=dtype, device="cuda")
    _check_against_reference(n, None if same else m, d, "auto", True, dtype=dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_topk(dtype):
    _skip_unless_runnable("triton", "cuda")
    q = torch.randn(300, 128, device="cuda").to(dtype)
    g = torch.randn(5000, 128, device="cuda").to(dtype)
    values, idx = topk_distances(q, g, 20, chunk_size=1024)
    full = pairwise_distance_reference(q.double(), g.double())
    ref_v = full.sort(dim=1).values[:, :20]
    torch.testing.assert_close(values.double(), ref_v, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full.gather(1, idx), ref_v, rtol=1e-4, atol=1e-4)


def test_benchmark_smoke_cpu(tmp_path):
    from dist_reid.bench.kernels import main, run_kernel_benchmark

    payload = run_kernel_benchmark(
        device="cpu",
        sizes=(16,),
        widths=(8,),
        warmup=0,
        repeats=1,
        topk_shapes=[(20, 50)],
        topk_width=8,
        topk_k=5,
    )
    ops = {(r["op"], r["provider"].split(" (")[0]) for r in payload["rows"]}
    assert {
        ("pairwise", "torch"),
        ("pairwise", "cdist"),
        ("triplet_hard", "torch"),
        ("triplet_weighted", "torch"),
        ("triplet_weighted_official", "torch"),
        ("center", "torch"),
        ("center_layout", "torch"),
    } <= ops
    assert all(r["error"] is None and r["ms"] > 0 for r in payload["rows"])
    assert len({tuple(r) for r in payload["rows"]}) == 1  # one column set
    assert payload["machine"]["torch"] == torch.__version__
    rc = main(
        [
            "--device",
            "cpu",
            "--sizes",
            "8",
            "--widths",
            "4",
            "--topk",
            "none",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0 and (tmp_path / "kernels.json").is_file() and (tmp_path / "kernels.md").is_file()
