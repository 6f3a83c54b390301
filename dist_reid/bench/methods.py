"""``dist-reid bench methods``: size, cost and training speed of every registered method.

For each method (``agw`` and whichever of ``pdm``, ``icre``, ``emif``, ``mip`` are registered)
the model and loss are built from ``configs/sysu/<method>.yaml`` (plus dotted overrides) and
measured on random images at the config's input size:

* ``params_M``: all parameters, classifier included (``--num-classes``, SYSU-MM01's 395 by
  default), in millions;
* ``gflops``: forward GFLOPs per image, counted by ``torch.utils.flop_counter.FlopCounterMode``
  on a batch of one visible and one infrared image (eval mode: BatchNorm cannot train on one
  sample per modality), divided by 2. FlopCounterMode counts 2 FLOPs per multiply-accumulate
  and only matmul/conv-like ops (no norms, activations or pooling);
* ``cpu_train_img_s``: images per second of full training steps (forward, loss, backward, SGD
  step) on the CPU with a sampler-shaped batch (``--ids`` identities x ``--instances`` per
  modality), after ``--warmup`` untimed steps; ``cpu_s_per_img``: the process CPU time (all
  threads) per image of the same steps, steadier than wall time on a shared machine;
* ``gpu_train_img_s``: the same on CUDA when a GPU is present (``None`` otherwise).
"""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dist_reid.bench.common import machine_info, markdown_table, write_report

METHODS = ("agw", "pdm", "icre", "emif", "mip")
_REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
_CAMS = (1, 3)  # a SYSU-MM01 visible and infrared camera, for models that embed camera ids


def registered_methods(config_dir: Path) -> list[str]:
    """The methods of :data:`METHODS` that are registered as model and loss and have a config."""
    from dist_reid.losses import LOSSES
    from dist_reid.models import MODELS

    out = []
    for name in METHODS:
        try:
            MODELS.get(name)
            LOSSES.get(name)
        except KeyError:
            continue
        if (config_dir / f"{name}.yaml").exists():
            out.append(name)
    return out


def _batch(
    ids: int, instances: int, height: int, width: int, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random images in the sampler's layout: K visible per id, then K infrared per id."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ids).repeat_interleave(instances).repeat(2)
    modalities = torch.tensor([0, 1]).repeat_interleave(ids * instances)
    n = labels.shape[0]
    return {
        "images": torch.randn(n, 3, height, width, generator=g).to(device),
        "labels": labels.to(device),
        "modalities": modalities.to(device),
        "cams": torch.tensor(_CAMS).repeat_interleave(ids * instances).to(device),
    }


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Call ``forward`` the way the trainer does (``cams`` only if the model names it)."""
    extras = {}
    if "cams" in inspect.signature(model.forward).parameters:
        extras["cams"] = batch["cams"]
    return model(batch["images"], batch["modalities"], **extras)


def count_gflops(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Forward GFLOPs of ``model`` on ``batch`` (eval mode, no grad), as FlopCounterMode counts."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            _forward(model, batch)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def train_throughput(
    model: nn.Module,
    loss_fn: nn.Module,
    batch: dict[str, torch.Tensor],
    steps: int,
    warmup: int,
) -> tuple[float, float]:
    """(images per second, CPU seconds per image of this process, all threads) of full SGD
    training steps (the trainer's loss contract: outputs cast to fp32, terms summed). The CPU
    time is the steadier number on a shared machine, where wall time depends on the load."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    device = batch["images"].device

    def step() -> None:
        outputs = {k: v.float() for k, v in _forward(model, batch).items()}
        terms = loss_fn(outputs, batch["labels"], batch["modalities"])
        total = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    images = batch["images"].shape[0] * steps
    return images / (time.perf_counter() - start), (time.process_time() - cpu_start) / images


def bench_method(
    name: str,
    config: Path,
    overrides: Sequence[str] = (),
    num_classes: int = 395,
    ids: int = 2,
    instances: int = 2,
    steps: int = 3,
    warmup: int = 1,
    gpu: bool | None = None,
) -> dict[str, Any]:
    """One table row for method ``name`` built from ``config`` (see the module docstring)."""
    from dist_reid.builders import build_loss, build_model
    from dist_reid.config import load_config

    cfg = load_config(str(config), list(overrides))
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=num_classes, pretrained=False)  # speed only
    loss_fn = build_loss(cfg)
    h, w = cfg.data.height, cfg.data.width
    row: dict[str, Any] = {
        "method": name,
        "config": f"{config.parent.name}/{config.name}",
        "backbone": cfg.model.backbone,
        "input": f"{h}x{w}",
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": count_gflops(model, _batch(1, 1, h, w, torch.device("cpu"))) / 2,
    }
    cpu_batch = _batch(ids, instances, h, w, torch.device("cpu"))
    row["cpu_batch"] = cpu_batch["images"].shape[0]
    row["cpu_train_img_s"], row["cpu_s_per_img"] = train_throughput(
        model, loss_fn, cpu_batch, steps, warmup
    )
    use_gpu = torch.cuda.is_available() if gpu is None else gpu
    row["gpu_train_img_s"] = None
    if use_gpu:
        dev = torch.device("cuda")
        model.to(dev)
        # the recipes' per-GPU batch: 8 ids x 4 per modality
        gpu_batch = _batch(8, 4, h, w, dev)
        row["gpu_batch"] = gpu_batch["images"].shape[0]
        row["gpu_train_img_s"], _ = train_throughput(model, loss_fn, gpu_batch, 3 * steps, 2)
        model.cpu()
    return row


def run_methods_benchmark(
    methods: Sequence[str] | None = None,
    config_dir: Path = _REPO_CONFIGS / "sysu",
    overrides: Sequence[str] = (),
    **kwargs: Any,
) -> dict[str, Any]:
    """Rows for ``methods`` (default: every registered one) plus the machine description."""
    names = list(methods) if methods else registered_methods(config_dir)
    rows = []
    errors = {}
    threads = torch.get_num_threads()
    for name in names:
        config = config_dir / f"{name}.yaml"
        if not config.exists():
            raise FileNotFoundError(f"no config for method {name!r}: {config}")
        try:
            rows.append(bench_method(name, config, overrides, **kwargs))
        except Exception as exc:  # one broken method must not hide the others' numbers
            errors[name] = f"{type(exc).__name__}: {exc}"
    payload: dict[str, Any] = {
        "rows": rows,
        "machine": {**machine_info(), "torch_threads": threads},
        "settings": {
            "overrides": " ".join(overrides) or "none",
            **{k: v for k, v in kwargs.items() if v is not None},
            "gflops": "forward, 1 visible + 1 infrared image, per image; 2 FLOPs per MAC",
        },
    }
    if errors:
        payload["errors"] = errors
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: measure, write ``methods.{json,md}`` under ``--out``, print the table."""
    parser = argparse.ArgumentParser(
        prog="dist-reid bench methods", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--methods", default=None, help="comma-separated (default: every registered method)"
    )
    parser.add_argument(
        "--config-dir",
        type=Path,
        default=_REPO_CONFIGS / "sysu",
        help="folder of <method>.yaml (default: the repository's configs/sysu)",
    )
    parser.add_argument("--num-classes", type=int, default=395, help="classifier width")
    parser.add_argument("--ids", type=int, default=2, help="identities per CPU training batch")
    parser.add_argument("--instances", type=int, default=2, help="images per id and modality")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    parser.add_argument(
        "--no-gpu", dest="gpu", action="store_false", default=None, help="skip the GPU column"
    )
    parser.add_argument("--out", default="runs/bench", help="report folder (default: runs/bench)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides for every config, e.g. data.height=128"
    )
    args = parser.parse_args(argv)
    if min(args.ids, args.instances, args.steps) < 1 or args.warmup < 0:
        parser.error("--ids, --instances and --steps must be >= 1 and --warmup >= 0")
    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    payload = run_methods_benchmark(
        methods,
        args.config_dir,
        args.overrides,
        num_classes=args.num_classes,
        ids=args.ids,
        instances=args.instances,
        steps=args.steps,
        warmup=args.warmup,
        gpu=args.gpu,
    )
    json_path, md_path = write_report("methods", payload, args.out)
    print(markdown_table(payload["rows"]), end="")
    for name, err in payload.get("errors", {}).items():
        print(f"{name}: FAILED ({err})")
    print(f"wrote {json_path} and {md_path}")
    return 1 if payload.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
