"""Test-wide settings: offline hubs, Triton interpreter before any kernel import, GPU skips."""

from __future__ import annotations

import os

# Both must be set before timm / triton kernels are imported (stack.md sections 1 and 5).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dist_reid.data.synthetic.layouts import SynthSummary, generate


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_trees(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, SynthSummary]]:
    """Small synthetic trees of all three layouts, generated once per session."""
    base = tmp_path_factory.mktemp("synthetic")
    trees = {}
    for layout, num_ids, per_camera in (("sysu", 30, 3), ("regdb", 12, 4), ("llcm", 30, 2)):
        root = base / layout
        trees[layout] = (
            root,
            generate(layout, root, num_ids, seed=7, images_per_camera=per_camera),
        )
    return trees


@pytest.fixture
def free_port():
    """``free_port()`` -> a free loopback TCP port for a process group's rendezvous (call it once
    per launch: two launches in one test must not share a port)."""
    import socket

    def pick() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    return pick


@pytest.fixture
def two_process_probe(tmp_path: Path, free_port):
    """Run ``tests/integration/ddp_probe.py`` under ``accelerate launch`` on 2 CPU processes.

    Returns both ranks' dumps (losses, flattened weights, batch size) after checking the launch
    succeeded, both ranks saw a world of 2 and DDP kept their weights identical; with
    ``loss_falls`` it also checks the mean of the last 3 losses is below that of the first 3.
    """
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]

    def run(
        config: str | Path, steps: int, overrides: list[str], loss_falls: bool = True
    ) -> list[dict]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()),
            str(repo / "tests/integration/ddp_probe.py"), str(config), str(tmp_path), str(steps), *overrides,
        ]  # fmt: skip
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
        assert [r["world"] for r in ranks] == [2, 2]
        torch.testing.assert_close(
            ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0
        )  # DDP in sync
        if loss_falls:
            for r in ranks:
                early, late = sum(r["losses"][:3]) / 3, sum(r["losses"][-3:]) / 3
                assert late < early, r["losses"]
        return ranks

    return run


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for modules of tiny tensors: on a 2-core machine two torch threads
    contend with each other (and with the Triton interpreter's OpenBLAS threads, which keep
    spinning) and ran up to 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_run_overrides(
    root: Path, out: Path, name: str, *extra: str, eval_subset: bool = True
) -> list[str]:
    """Overrides that shrink a recipe to a test run on the existing tree ``root`` (generation
    off: the presets' ``data.synthetic`` arguments describe another tree): 64x32 inputs, 4 ids x
    2 images per modality, no loader workers or trackers, torch kernels; ``eval_subset`` scores
    trial 0 of the first setting only. Import it as ``from conftest import tiny_run_overrides``."""
    subset = ["eval.trials=[0]", "eval.settings=[all]"] if eval_subset else []
    return [
        f"data.root={root}",
        "data.synthetic.enabled=false",
        f"run.output_dir={out}",
        f"run.name={name}",
        "data.height=64",
        "data.width=32",
        "data.num_workers=0",
        "train.ids_per_batch=4",
        "train.instances_per_modality=2",
        "train.trackers=[]",
        "train.kernels=torch",
        *subset,
        *extra,
    ]


def error_lines(stderr: str) -> list[str]:
    """``stderr`` without the log records a run prints before it fails (INFO/WARNING lines, a
    rank's prefixed ones): what is left is the error. Import it as
    ``from conftest import error_lines``."""
    records = ("INFO ", "WARNING ", "DEBUG ", "[rank ")
    return [line for line in stderr.strip().splitlines() if not line.startswith(records)]


def loss_terms_and_grads(loss, outputs: dict, labels, modalities) -> tuple[dict, dict]:
    """A loss's terms and the gradients of their sum w.r.t. every output (None where an output
    is not read). Import it as ``from conftest import loss_terms_and_grads``."""
    out = {k: v.clone().requires_grad_() for k, v in outputs.items()}
    terms = loss(out, labels, modalities)
    sum(terms.values()).backward()
    return terms, {k: v.grad for k, v in out.items()}


def assert_layout_path_is_sync_free(
    layout_loss, general_loss, outputs: dict, labels, modalities, grad_keys=None
) -> None:
    """After its first (checked) batch, ``layout_loss`` computes the same terms, forward and
    backward, under :func:`host_syncs_raise`, with finite non-zero gradients for ``grad_keys``
    (default: every output); ``general_loss`` (no layout) does trip the stand-in. Import it as
    ``from conftest import assert_layout_path_is_sync_free``."""
    first, _ = loss_terms_and_grads(layout_loss, outputs, labels, modalities)
    with host_syncs_raise():
        terms, grads = loss_terms_and_grads(layout_loss, outputs, labels, modalities)
    for key in first:
        torch.testing.assert_close(terms[key], first[key], msg=key)
    checked = [grads[k] for k in (grad_keys or grads)]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in checked)
    with pytest.raises(AssertionError, match="host-syncing"), host_syncs_raise():
        loss_terms_and_grads(general_loss, outputs, labels, modalities)


def awkward_layouts() -> list:
    """Sampler layouts of awkward sizes (one identity of one image, odd P and K, both halves
    first) that the methods' layout-path tests run on. Import it as
    ``from conftest import awkward_layouts``."""
    from reid_kernels import BatchLayout

    return [
        BatchLayout(1, 1),
        BatchLayout(2, 3, infrared_first=True),
        BatchLayout(5, 2),
        BatchLayout(3, 1, infrared_first=True),
        BatchLayout(4, 3),
    ]


def sampler_layout_labels(layout, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, modalities) of a batch in ``layout`` (a ``reid_kernels.BatchLayout``) as the
    sampler lays it out: distinct, unsorted identities, K rows each in both halves. Import it
    as ``from conftest import sampler_layout_labels``."""
    p, k = layout.identities, layout.instances
    ids = torch.randperm(30, generator=torch.Generator().manual_seed(seed))[:p] * 2 + 1
    labels = ids.repeat_interleave(k).repeat(2)
    first = int(layout.infrared_first)
    modalities = torch.cat([torch.full((p * k,), first), torch.full((p * k,), 1 - first)])
    return labels, modalities


# torch functions that read device values on the host (a sync on a GPU) to size their output.
HOST_SYNC_OPS = ("unique", "nonzero", "bincount", "argwhere", "masked_select")


@contextlib.contextmanager
def host_syncs_raise() -> Iterator[None]:
    """The CPU stand-in for "no host sync": inside the block, the ops that sync on a GPU raise
    ``AssertionError("a host-syncing op was called")``: :data:`HOST_SYNC_OPS`, ``.item()``,
    ``.tolist()``, ``.nonzero()``, truth values and int/float conversions of tensors, and
    indexing with a boolean mask. Import it as ``from conftest import host_syncs_raise``."""

    def syncs(*args, **kwargs):
        raise AssertionError("a host-syncing op was called")

    getitem = torch.Tensor.__getitem__

    def no_mask_getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
            raise AssertionError("a host-syncing op was called (boolean-mask indexing)")
        return getitem(self, index)

    with pytest.MonkeyPatch.context() as patch:
        for name in HOST_SYNC_OPS:
            patch.setattr(torch, name, syncs)
        for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__"):
            patch.setattr(torch.Tensor, name, syncs)
        patch.setattr(torch.Tensor, "__getitem__", no_mask_getitem)
        yield


@contextlib.contextmanager
def cuda_syncs_raise() -> Iterator[None]:
    """On a GPU, the real check behind :func:`host_syncs_raise`: inside the block every
    CUDA host sync raises (``torch.cuda.set_sync_debug_mode("error")``). Import it as
    ``from conftest import cuda_syncs_raise``."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
