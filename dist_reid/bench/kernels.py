"""``dist-reid bench kernels``: the reid_kernels ops against eager torch, torch.compile and cdist.

For each loss (pairwise distance, batch-hard triplet, weighted triplet in its exact form and in
the released code's (``triplet_weighted_official``: ``wrt_form="official"``), center losses,
and center losses given the sampler's batch layout (``center_layout``: the Triton provider runs
the path without host syncs, the torch and compile providers the general reference) and
each batch size x feature width, one forward + backward is timed (median of repeats after warm-up;
CUDA events on a GPU) with its peak extra memory (``torch.cuda.max_memory_allocated`` above what
was allocated before the call; ``None`` on CPU). Providers:

* ``torch``: the eager torch reference of the op (what ``backend="torch"`` runs);
* ``compile``: the same reference under ``torch.compile``;
* ``cdist``: ``torch.cdist`` (pairwise distance only);
* ``triton``: the Triton kernels (CUDA only; the interpreter is not a benchmark).

The streaming top-k (``topk_distances``) is timed against the full distance matrix followed by
``torch.topk``, for 4k x 10k and (GPU only) 20k x 50k. Its rows also give the bytes of features
read per second and the distance TFLOP/s, to set against the card's bandwidth and matrix peaks.

Batches follow the sampler layout: n/8 identities x 4 visible images, then the same identities
x 4 infrared images, an identity's rows contiguous in each half.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dist_reid.bench.common import machine_info, markdown_table, write_report

LOSS_OPS = (
    "pairwise",
    "triplet_hard",
    "triplet_weighted",
    "triplet_weighted_official",
    "center",
    "center_layout",
)
DEFAULT_SIZES = (64, 128, 256, 512, 1024)
DEFAULT_WIDTHS = (512, 768, 2048)
QUICK_SIZES = (64, 256, 1024)
QUICK_WIDTHS = (512, 2048)
IMAGES_PER_ID = 8  # 4 visible + 4 infrared per identity (architecture decision 4)
INSTANCES = IMAGES_PER_ID // 2


def _kernels():
    import reid_kernels  # imported late so that `--help` works without torch warm-up

    return reid_kernels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory of one ``fn()`` above what was allocated before it (MiB); None on CPU."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _batch(n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    # the sampler's layout: all visible rows, then the same identities' infrared rows
    rows = torch.arange(n)
    ids = (rows % max(n // 2, 1)) // INSTANCES
    modalities = (rows >= n // 2).long()
    table = torch.randn(int(ids.max()) + 1, d, generator=gen).to(device)
    return x, ids.to(device), modalities.to(device), table


def _op_fn(op: str, provider: str) -> Callable[..., torch.Tensor]:
    """``(x, labels, modalities, table) -> scalar`` to backpropagate, for one op and provider."""
    rk = _kernels()
    backend = "triton" if provider == "triton" else "torch"
    if op == "pairwise":
        if provider == "cdist":
            return lambda x, lab, mod, tab: torch.cdist(x.float(), x.float()).sum()
        return lambda x, lab, mod, tab: rk.pairwise_distance(x, backend=backend).sum()
    if op in ("triplet_hard", "triplet_weighted", "triplet_weighted_official"):
        mode = op.split("_")[1]
        margin = 0.3 if mode == "hard" else None
        form = "official" if op.endswith("_official") else "exact"
        return lambda x, lab, mod, tab: rk.triplet_mining_loss(
            x, lab, margin=margin, mode=mode, backend=backend, wrt_form=form
        )
    if op == "center":
        return lambda x, lab, mod, tab: rk.center_losses(x, lab, mod, tab, backend=backend).total
    if op == "center_layout":
        # the kernels given the sampler's layout (no host sync) against the general reference
        if provider != "triton":
            return _op_fn("center", provider)

        def with_layout(x, lab, mod, tab):
            layout = rk.BatchLayout(x.shape[0] // IMAGES_PER_ID, INSTANCES)
            return rk.center_losses(x, lab, mod, tab, backend=backend, layout=layout).total

        return with_layout
    raise ValueError(f"unknown op {op!r}")


def _providers(op: str, device: torch.device, compile_ok: bool) -> list[str]:
    out = ["torch"]
    if compile_ok:
        out.append("compile")
    if op == "pairwise":
        out.append("cdist")
    if device.type == "cuda" and _kernels().HAS_TRITON:
        out.append("triton")
    return out


def _row(
    op: str, provider: str, n: int, m: int | None, d: int, k: int | None, dtype
) -> dict[str, Any]:
    # Every row has the same keys in the same order, so the markdown table stays aligned.
    return {
        "op": op,
        "provider": provider,
        "n": n,
        "m": m,
        "d": d,
        "k": k,
        "dtype": str(dtype).replace("torch.", ""),
        "ms": None,
        "speedup": None,
        "peak_extra_mib": None,
        "feature_read_gbps": None,
        "distance_tflops": None,
        "error": None,
    }


def _measure(
    row: dict[str, Any], fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int
) -> None:
    try:
        row["ms"] = time_call(fn, device, warmup, repeats)
        row["peak_extra_mib"] = peak_extra_mib(fn, device)
    except Exception as err:  # one provider failing (compile, out of memory) must not sink the run
        text = str(err).strip().splitlines()
        row["error"] = f"{type(err).__name__}: {text[0][:160] if text else ''}"
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _bench_losses(
    device, sizes, widths, dtype, warmup, repeats, use_compile
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    compiled: dict[str, Callable] = {}
    for op in LOSS_OPS:
        for d in widths:
            for n in sizes:
                x0, labels, modalities, table = _batch(n, d, dtype, device)
                table = table.requires_grad_()
                base_ms = None
                for provider in _providers(op, device, use_compile):
                    if provider == "compile":
                        # One compiled callable per op: on the second shape dynamo recompiles
                        # with dynamic sizes instead of once per size.
                        if op not in compiled:
                            compiled[op] = torch.compile(_op_fn(op, "torch"))
                        fn = compiled[op]
                    else:
                        fn = _op_fn(op, provider)
                    x = x0.clone().requires_grad_()

                    def step(fn=fn, x=x, lab=labels, mod=modalities, tab=table):
                        x.grad = None
                        tab.grad = None
                        fn(x, lab, mod, tab).backward()

                    row = _row(op, provider, n, n if op == "pairwise" else None, d, None, dtype)
                    _measure(row, step, device, warmup, repeats)
                    if provider == "torch":
                        base_ms = row["ms"]
                    if base_ms and row["ms"]:
                        row["speedup"] = base_ms / row["ms"]
                    rows.append(row)
    return rows


def _bench_topk(device, shapes, d, k, dtype, warmup, repeats) -> list[dict[str, Any]]:
    rk = _kernels()
    rows: list[dict[str, Any]] = []
    backend = "triton" if (device.type == "cuda" and rk.HAS_TRITON) else "torch"
    for nq, ng in shapes:
        gen = torch.Generator(device="cpu").manual_seed(1)
        q = torch.randn(nq, d, generator=gen).to(device=device, dtype=dtype)
        g = torch.randn(ng, d, generator=gen).to(device=device, dtype=dtype)

        def streaming(q=q, g=g):
            return rk.topk_distances(q, g, k, backend=backend)

        def full(q=q, g=g):
            with torch.no_grad():
                return torch.topk(
                    rk.pairwise_distance(q, g, backend=backend), k, dim=1, largest=False
                )

        bytes_read = (nq + ng) * d * q.element_size()
        flops = 2.0 * nq * ng * d
        pair = []
        for name, fn in (
            (f"full matrix + torch.topk ({backend})", full),
            (f"streaming topk_distances ({backend})", streaming),
        ):
            row = _row("topk", name, nq, ng, d, k, dtype)
            _measure(row, fn, device, warmup, repeats)
            if row["ms"]:
                row["feature_read_gbps"] = bytes_read / (row["ms"] * 1e-3) / 1e9
                row["distance_tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            pair.append(row)
        if pair[0]["ms"] and pair[1]["ms"]:
            pair[0]["speedup"] = 1.0
            pair[1]["speedup"] = pair[0]["ms"] / pair[1]["ms"]
        rows += pair
    return rows


def run_kernel_benchmark(
    device: str | torch.device | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    dtype: torch.dtype | str | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    use_compile: bool | None = None,
    topk_shapes: Sequence[tuple[int, int]] | None = None,
    topk_width: int = 2048,
    topk_k: int = 100,
) -> dict[str, Any]:
    """Time fwd+bwd of every loss for each (size, width), and the streaming top-k.

    Defaults depend on the device: GPU runs bf16 inputs (what autocast hands the losses),
    10 warm-ups, 30 repeats, torch.compile on, top-k for 4k x 10k and 20k x 50k; CPU runs fp32,
    1 warm-up, 3 repeats, no torch.compile (inductor compiles take minutes on a small CPU) and
    the 4k x 10k top-k only. Returns ``{"machine", "config", "rows"}``.
    """
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    gpu = dev.type == "cuda"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    warmup = (10 if gpu else 1) if warmup is None else warmup
    repeats = (30 if gpu else 3) if repeats is None else repeats
    use_compile = gpu if use_compile is None else use_compile
    if topk_shapes is None:
        topk_shapes = [(4000, 10000), (20000, 50000)] if gpu else [(4000, 10000)]
    rows = _bench_losses(dev, list(sizes), list(widths), dtype, warmup, repeats, use_compile)
    rows += _bench_topk(dev, list(topk_shapes), topk_width, topk_k, dtype, warmup, repeats)
    return {
        "machine": machine_info(),
        "config": {
            "device": str(dev),
            "dtype": str(dtype).replace("torch.", ""),
            "sizes": list(sizes),
            "widths": list(widths),
            "warmup": warmup,
            "repeats": repeats,
            "torch_compile": use_compile,
            "topk_shapes": [f"{a}x{b}" for a, b in topk_shapes],
            "topk_width": topk_width,
            "topk_k": topk_k,
            "batch_layout": f"{IMAGES_PER_ID} images per identity (4 visible + 4 infrared)",
            "timing": "median of repeats; CUDA events on GPU, perf_counter on CPU",
            "ms": "losses: one forward + backward; topk: one forward",
            "speedup": "losses: eager torch ms / ms; topk: full-matrix ms / ms",
            "memory": "peak_extra_mib = max_memory_allocated during one call - allocated before (GPU only)",
        },
        "rows": rows,
    }


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run the benchmark, write ``kernels.{json,md}`` under ``--out``, print the table."""
    parser = argparse.ArgumentParser(
        prog="dist-reid bench kernels", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)"
    )
    parser.add_argument("--out", default="runs/bench", help="report folder (default: runs/bench)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"batch sizes {QUICK_SIZES}, widths {QUICK_WIDTHS}, fewer repeats; "
        "on CPU also a 512-wide top-k (about a minute on 2 cores)",
    )
    parser.add_argument("--sizes", type=_ints, default=None, help="comma-separated batch sizes")
    parser.add_argument("--widths", type=_ints, default=None, help="comma-separated feature widths")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--compile",
        dest="use_compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the torch.compile provider (default: on GPU only)",
    )
    parser.add_argument(
        "--topk",
        default=None,
        help="comma-separated QxG top-k shapes, e.g. 4000x10000,20000x50000 ('none' to skip)",
    )
    args = parser.parse_args(argv)

    dev = (
        torch.device(args.device)
        if args.device
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    gpu = dev.type == "cuda"
    kwargs: dict[str, Any] = {
        "device": dev,
        "sizes": args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES),
        "widths": args.widths or (QUICK_WIDTHS if args.quick else DEFAULT_WIDTHS),
        "dtype": args.dtype,
        "repeats": args.repeats
        if args.repeats is not None
        else (10 if args.quick and gpu else None),
        "use_compile": args.use_compile,
    }
    if args.quick and not gpu:
        kwargs["topk_width"] = 512  # keeps the CPU run near a minute
    if args.topk is not None:
        kwargs["topk_shapes"] = (
            []
            if args.topk == "none"
            else [tuple(int(v) for v in shape.split("x")) for shape in args.topk.split(",")]
        )
    payload = run_kernel_benchmark(**kwargs)
    json_path, md_path = write_report("kernels", payload, args.out)
    print(markdown_table(payload["rows"]), end="")
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
