"""center_losses / segment_mean: backends vs float64 references and loop oracles; degenerate
batches (N = 1, one identity, one modality); gradients w.r.t. x and the learnable centers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import host_syncs_raise
from reid_kernels import (
    BatchLayout,
    batch_identities,
    center_losses,
    center_losses_reference,
    check_layout,
    dispatch,
    segment_mean,
    segment_mean_reference,
)

BACKENDS = ("triton", "torch")
TERMS = ("total", "hetero_triplet", "cross_modal", "center")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _poison_and_seed(monkeypatch):
    monkeypatch.setenv(dispatch.POISON_ENV, "1")
    torch.manual_seed(99)


def _skip_unless_runnable(backend: str, device: str = "cpu") -> None:
    if backend == "triton" and device == "cpu" and not dispatch.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 was not set before import")
    if backend == "triton" and device == "cuda" and dispatch.INTERPRET:
        pytest.skip("compiled kernels: run the GPU tests with TRITON_INTERPRET=0")


def _batch(n: int, num_ids: int, d: int, device: str = "cpu", one_modality: bool = False):
    x = torch.randn(n, d, dtype=torch.float64, device=device)
    labels = ((torch.arange(n) % num_ids)[torch.randperm(n)] * 5 + 2).to(device)
    modalities = torch.zeros(n, dtype=torch.long) if one_modality else torch.randint(0, 2, (n,))
    return x, labels, modalities.to(device)


def _compare(
    x64,
    labels,
    modalities,
    table64,
    backend,
    dtype=torch.float32,
    tol=1e-5,
    grad_tol=1e-5,
    layout=None,
    **kw,
):
    x64 = x64.to(dtype).double().requires_grad_()
    t64 = None if table64 is None else table64.detach().clone().requires_grad_()
    ref = center_losses_reference(x64, labels, modalities, t64, **kw)
    inputs64 = [x64] + ([t64] if t64 is not None else [])
    ref_grads = (
        torch.autograd.grad(ref.total, inputs64, allow_unused=True)
        if ref.total.requires_grad
        else [None] * len(inputs64)
    )
    x = x64.detach().to(dtype).requires_grad_()
    table = None if t64 is None else t64.detach().float().requires_grad_()
    out = center_losses(x, labels, modalities, table, backend=backend, layout=layout, **kw)
    for name in TERMS:
        got, want = getattr(out, name), getattr(ref, name)
        assert got.shape == () and torch.isfinite(got), name
        torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol, msg=name)
    torch.testing.assert_close(
        out.batch_centers.double(), ref.batch_centers.detach(), rtol=tol, atol=tol
    )
    assert torch.equal(out.center_labels, ref.center_labels)
    assert torch.equal(out.center_modalities, ref.center_modalities)
    inputs = [x] + ([table] if table is not None else [])
    if out.total.requires_grad:
        grads = torch.autograd.grad(out.total * 1.3, inputs, allow_unused=True)
        for got, want in zip(grads, ref_grads, strict=True):
            want = torch.zeros_like(got, dtype=torch.float64) if want is None else want * 1.3
            got = torch.zeros_like(want) if got is None else got.double()
            torch.testing.assert_close(got, want, rtol=grad_tol, atol=grad_tol)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_table", [True, False])
@pytest.mark.parametrize(
    "n, num_ids, d", [(1, 1, 5), (8, 1, 12), (6, 6, 9), (37, 5, 23), (70, 9, 40), (64, 8, 32)]
)
def test_matches_float64_reference(n, num_ids, d, with_table, backend):
    _skip_unless_runnable(backend)
    x, labels, modalities = _batch(n, num_ids, d)
    table = torch.randn(int(labels.max()) + 4, d, dtype=torch.float64) if with_table else None
    _compare(
        x,
        labels,
        modalities,
        table,
        backend,
        margin=0.3,
        hetero_weight=1.0,
        cross_weight=0.5,
        center_weight=0.01,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_modality_and_soft_margin(backend):
    _skip_unless_runnable(backend)
    x, labels, modalities = _batch(30, 4, 17, one_modality=True)
    out = _compare(x, labels, modalities, None, backend, margin=None)
    assert out.cross_modal.item() == 0.0  # no identity has both modalities
    assert out.center.item() == 0.0  # no table
    assert bool((out.center_modalities == 0).all()) and out.batch_centers.shape == (4, 17)


def _layout_batch(layout: BatchLayout, d: int, device: str = "cpu"):
    """A batch as the sampler lays it out: distinct, unsorted identities, K rows each per half."""
    p, k = layout.identities, layout.instances
    ids = torch.randperm(40)[:p] * 3 + 1
    labels = ids.repeat_interleave(k).repeat(2)
    first = int(layout.infrared_first)
    modalities = torch.cat([torch.full((p * k,), first), torch.full((p * k,), 1 - first)])
    x = torch.randn(2 * p * k, d, dtype=torch.float64)
    return x.to(device), labels.to(device), modalities.to(device)


LAYOUTS = [
    BatchLayout(1, 1),
    BatchLayout(2, 3, infrared_first=True),
    BatchLayout(5, 2),
    BatchLayout(7, 4, infrared_first=True),
    BatchLayout(3, 5),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_table", [True, False])
@pytest.mark.parametrize("margin", [0.3, None])
@pytest.mark.parametrize("layout, d", list(zip(LAYOUTS, (5, 37, 130, 23, 1), strict=True)))
def test_layout_path_equals_the_general_float64_reference(layout, d, margin, with_table, backend):
    """The sync-free path gives the general reference's values, centers and gradients."""
    _skip_unless_runnable(backend)
    x, labels, modalities = _layout_batch(layout, d)
    check_layout(labels, modalities, layout)
    table = torch.randn(int(labels.max()) + 3, d, dtype=torch.float64) if with_table else None
    _compare(
        x,
        labels,
        modalities,
        table,
        backend,
        layout=layout,
        margin=margin,
        hetero_weight=1.0,
        cross_weight=0.5,
        center_weight=0.01,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_path_reads_no_value_on_the_host(backend):
    """The CPU stand-in for "no host sync" (:func:`conftest.host_syncs_raise`): the layout path
    never calls the ops that sync on a GPU, forward or backward."""
    _skip_unless_runnable(backend)
    layout = BatchLayout(4, 3, infrared_first=True)
    x, labels, modalities = _layout_batch(layout, 19)
    x = x.float().requires_grad_()
    table = torch.randn(int(labels.max()) + 1, 19, requires_grad=True)
    with host_syncs_raise():
        out = center_losses(x, labels, modalities, table, backend=backend, layout=layout)
        out.total.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # and the general path does sync (the stand-in detects what it should)
    with pytest.raises(AssertionError, match="host-syncing"), host_syncs_raise():
        center_losses(x, labels, modalities, table, backend=backend)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_identities_of_a_layout_equal_torch_unique(layout):
    _, labels, _ = _layout_batch(layout, 1)
    uniq, inverse = batch_identities(labels, layout)
    want_uniq, want_inverse = torch.unique(labels, return_inverse=True)
    assert torch.equal(uniq, want_uniq) and torch.equal(inverse, want_inverse)
    assert all(map(torch.equal, batch_identities(labels), (want_uniq, want_inverse)))


def test_check_layout_names_what_is_wrong():
    layout = BatchLayout(3, 2)
    x, labels, modalities = _layout_batch(layout, 4)
    check_layout(labels, modalities, layout)
    with pytest.raises(ValueError, match="has 12 rows"):
        check_layout(labels[:10], modalities[:10], layout)
    with pytest.raises(ValueError, match="visible half first"):
        check_layout(labels, 1 - modalities, layout)
    with pytest.raises(ValueError, match="contiguous"):
        check_layout(labels[torch.randperm(12)].roll(1), modalities, layout)
    twice = labels.clone()
    twice[2:4] = labels[0]
    twice[8:10] = labels[0]
    with pytest.raises(ValueError, match="two slots"):
        check_layout(twice, modalities, layout)
    with pytest.raises(ValueError, match="rows"):
        center_losses(x[:10], labels[:10], modalities[:10], layout=layout)


def test_segment_means_against_loop_oracle():
    x = torch.randn(41, 13, dtype=torch.float64)
    seg = torch.randint(0, 9, (41,))
    seg[seg == 4] = 5  # segment 4 empty
    oracle = torch.stack(
        [
            x[seg == s].mean(0) if (seg == s).any() else torch.zeros(13, dtype=torch.float64)
            for s in range(9)
        ]
    )
    for backend in BACKENDS:
        if backend == "triton" and not dispatch.INTERPRET:
            continue
        got = segment_mean(x.float(), seg, 9, backend=backend)
        torch.testing.assert_close(got.double(), oracle, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(segment_mean_reference(x, seg, 9), oracle)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_mean_gradient(dtype):
    _skip_unless_runnable("triton")
    x = torch.randn(50, 37, dtype=torch.float64).to(dtype)
    seg = torch.randint(0, 7, (50,))
    xr = x.double().requires_grad_()
    up = torch.randn(7, 37, dtype=torch.float64)
    (segment_mean_reference(xr, seg, 7) * up).sum().backward()
    xt = x.clone().requires_grad_()
    out = segment_mean(xt, seg, 7, backend="triton")
    (out * up.float()).sum().backward()
    torch.testing.assert_close(
        out.double(), segment_mean_reference(x.double(), seg, 7), rtol=1e-5, atol=1e-5
    )
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(xt.grad.double(), xr.grad, rtol=tol, atol=tol)


def test_hetero_center_triplet_matches_hctri_loop():
    """HcTri's formulation (P identities x K per modality, centers by chunk, loops) by hand."""
    p, k, d = 4, 3, 6
    x = torch.randn(2 * p * k, d, dtype=torch.float64)
    ids = torch.arange(p).repeat_interleave(k)
    labels = torch.cat([ids, ids]) + 10
    modalities = torch.cat([torch.zeros(p * k), torch.ones(p * k)]).long()
    centers = torch.stack([chunk.mean(0) for chunk in x.chunk(2 * p)])  # V centers, then IR
    c_ids = torch.cat([torch.arange(p), torch.arange(p)])
    losses, pulls = [], []
    for a in range(2 * p):
        dist = (centers - centers[a]).norm(dim=1)
        d_ap = dist[c_ids == c_ids[a]].max()
        d_an = dist[c_ids != c_ids[a]].min()
        losses.append(F.relu(d_ap - d_an + 0.3))
    for i in range(p):
        pulls.append((centers[i] - centers[p + i]).norm())
    table = torch.randn(20, d, dtype=torch.float64)
    center = 0.5 * ((x - table[labels]) ** 2).sum(1).mean()
    for backend in BACKENDS:
        if backend == "triton" and not dispatch.INTERPRET:
            continue
        out = center_losses(
            x.float(), labels, modalities, table.float(), margin=0.3, backend=backend
        )
        assert abs(out.hetero_triplet.item() - torch.stack(losses).mean().item()) < 1e-5
        assert abs(out.cross_modal.item() - torch.stack(pulls).mean().item()) < 1e-5
        assert abs(out.center.item() - center.item()) < 1e-4
        assert (
            abs(out.total.item() - (out.hetero_triplet + out.cross_modal + out.center).item())
            < 1e-5
        )


def test_reference_gradcheck():
    x, labels, modalities = _batch(12, 3, 4)
    x.requires_grad_()
    table = torch.randn(labels.max().item() + 1, 4, dtype=torch.float64, requires_grad=True)

    def fn(xx, tt):
        out = center_losses_reference(xx, labels, modalities, tt, margin=0.3)
        return out.hetero_triplet, out.cross_modal, out.center

    assert torch.autograd.gradcheck(fn, (x, table))


@pytest.mark.parametrize("backend", BACKENDS)
def test_table_gradient_only_on_used_rows(backend):
    _skip_unless_runnable(backend)
    x, labels, modalities = _batch(20, 3, 8)
    table = torch.randn(30, 8, requires_grad=True)
    out = center_losses(
        x.float(), labels, modalities, table, backend=backend, hetero_weight=0.0, cross_weight=0.0
    )
    out.total.backward()
    used = torch.zeros(30, dtype=torch.bool)
    used[labels] = True
    assert torch.count_nonzero(table.grad[~used]) == 0
    assert bool((table.grad[used].abs().sum(1) > 0).all())
    # Wen et al.: dL/dC_k = -(1/N) sum_{y_i=k} (x_i - C_k)
    k = int(labels[0])
    want = -(x.float()[labels == k] - table.detach()[k]).sum(0) / 20
    torch.testing.assert_close(table.grad[k], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    _skip_unless_runnable("triton")
    x, labels, modalities = _batch(48, 6, 33)
    table = torch.randn(int(labels.max()) + 1, 33, dtype=torch.float64)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    _compare(
        x,
        labels,
        modalities,
        table,
        "triton",
        dtype=dtype,
        tol=1e-4,
        grad_tol=tol,
        center_weight=0.1,
    )
    out = center_losses(
        x.to(dtype), labels, modalities, table.float(), backend="triton", center_weight=0.1
    )
    ref = center_losses_reference(x, labels, modalities, table, center_weight=0.1)
    torch.testing.assert_close(out.total.double(), ref.total, rtol=tol, atol=tol)


def test_rejects_bad_inputs():
    x = torch.randn(4, 3)
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="modalities"):
        center_losses(x, labels, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="center_table"):
        center_losses(x, labels, torch.tensor([0, 1, 0, 1]), torch.randn(2, 5))
    with pytest.raises(ValueError, match="index center_table"):
        center_losses(x, labels + 5, torch.tensor([0, 1, 0, 1]), torch.randn(2, 3))


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout, d", [(BatchLayout(8, 4), 2048), (BatchLayout(32, 4), 512)])
def test_gpu_layout_path_has_no_host_sync_and_matches(layout, d, dtype):
    _skip_unless_runnable("triton", "cuda")
    x64, labels, modalities = _layout_batch(layout, d, device="cuda")
    table = torch.randn(int(labels.max()) + 1, d, device="cuda", requires_grad=True)
    x = x64.to(dtype).requires_grad_()
    center_losses(x, labels, modalities, table, layout=layout).total.backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = center_losses(x, labels, modalities, table, layout=layout)
        out.total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    _compare(x64, labels, modalities, table.detach().double(), "auto", dtype=dtype, tol=1e-4,
             grad_tol=tol, layout=layout, center_weight=0.01)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, num_ids, d", [(1, 1, 5), (70, 9, 40), (64, 8, 2048), (256, 32, 768)])
def test_gpu_matches_reference(n, num_ids, d, dtype):
    _skip_unless_runnable("triton", "cuda")
    x, labels, modalities = _batch(n, num_ids, d, device="cuda")
    table = torch.randn(int(labels.max()) + 3, d, dtype=torch.float64, device="cuda")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    _compare(
        x,
        labels,
        modalities,
        table,
        "auto",
        dtype=dtype,
        tol=1e-4,
        grad_tol=tol,
        cross_weight=0.5,
        center_weight=0.01,
    )
