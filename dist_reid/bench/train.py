"""Training throughput: images/s per process and per step phase, peak memory, against a baseline
mode that runs the same model the way the single-GPU reference code does (fp32, eager, torch
DataLoader, unfused losses) — both measured in the same run, so each figure is a ratio.

``dist-reid bench train`` (one process, every mode in turn) and ``dist-reid bench scaling``
(the optimised mode on 1..N processes through torchrun; efficiency = img/s(N) / (N img/s(1))).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dist_reid.bench.common import machine_info, markdown_table, write_report
from dist_reid.engine.cpu_threads import threads_per_process
from dist_reid.engine.hooks import PHASES as PHASES  # the report's phase columns
from dist_reid.engine.hooks import TimerHook

DEFAULT_CONFIG = "configs/experiments/demo_sysu_agw.yaml"
MODES = {
    # The reference's way: fp32, eager, DataLoader, plain-torch losses.
    "baseline": (
        "train.mixed_precision=no",
        "train.channels_last=false",
        "train.compile=false",
        "data.pipeline=torch",
        "train.kernels=torch",
    ),
    # Ours: bf16 autocast, channels_last, DALI when on GPU, fused kernels when on GPU.
    "optimized": (
        "train.mixed_precision=bf16",
        "train.channels_last=true",
        "data.pipeline=auto",
        "train.kernels=auto",
    ),
    "optimized_compile": (
        "train.mixed_precision=bf16",
        "train.channels_last=true",
        "train.compile=true",
        "data.pipeline=auto",
        "train.kernels=auto",
    ),
}


def measure(config: str, overrides: Sequence[str], steps: int, warmup: int) -> dict[str, Any]:
    """Train ``warmup + steps`` optimiser steps with the engine's own loop (``build_trainer``
    with the timing hook alone: no checkpoints, evaluation or logging) and report this rank's
    view: images/s and ms per phase of the steps after ``warmup``, and peak memory."""
    from dist_reid.config import load_config
    from dist_reid.engine.build import build_trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            config,
            [
                *overrides,
                f"run.output_dir={out}",
                "run.name=bench",
                f"train.max_steps={warmup + steps}",
                f"train.epochs={warmup + steps}",  # at least one step an epoch
            ],
        )
        timer = TimerHook(warmup_steps=warmup)
        trainer = build_trainer(cfg, hooks=[timer])
        b = trainer.backend
        trainer.fit()
        timed = timer.summary()
        if timed["timed_steps"] != steps:
            raise RuntimeError(f"timed {timed['timed_steps']} steps, expected {steps}")
        peak = timed.pop("peak_memory_mib")
        result = {
            "rank": b.rank,
            "world_size": b.world_size,
            **timed,
            "peak_memory_mib": peak
            if peak is not None
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_memory_kind": "cuda allocated" if peak is not None else "process max RSS",
            "pipeline": getattr(trainer.pipeline, "name", type(trainer.pipeline).__name__),
        }
        gathered = b.all_gather_object(result)
        b.barrier()
        return {"ranks": gathered, "main": b.is_main}


def _reset_accelerate() -> None:
    """Let the next mode build an Accelerator with another precision in this process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def run_train_benchmark(
    config: str, modes: Sequence[str], overrides: Sequence[str], steps: int, warmup: int
) -> dict[str, Any]:
    rows = []
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {sorted(MODES)}")
        res = measure(config, [*overrides, *MODES[mode]], steps, warmup)["ranks"][0]
        rows.append(
            {"mode": mode, **{k: v for k, v in res.items() if k not in ("rank", "world_size")}}
        )
        _reset_accelerate()
    base = next((r for r in rows if r["mode"] == "baseline"), None)
    for row in rows:
        row["speedup_vs_baseline"] = row["images_per_s"] / base["images_per_s"] if base else None
    return {
        "machine": machine_info(),
        "config": {"file": config, "overrides": list(overrides), "steps": steps, "warmup": warmup},
        "rows": rows,
    }


def run_scaling_benchmark(
    config: str, max_procs: int, overrides: Sequence[str], steps: int, warmup: int, mode: str
) -> dict[str, Any]:
    rows = []
    for procs in range(1, max_procs + 1):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            share = threads_per_process({**os.environ, "LOCAL_WORLD_SIZE": str(procs)})
            env = {**os.environ, "OMP_NUM_THREADS": str(share)}
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(procs),
                "-m",
                "dist_reid.bench.train",
                "--worker",
                str(out),
                "--config",
                config,
                "--steps",
                str(steps),
                "--warmup",
                str(warmup),
                "--modes",
                mode,
                *overrides,
            ]
            proc = subprocess.run(command, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"scaling run with {procs} processes failed:\n{proc.stderr[-2000:]}"
                )
            ranks = json.loads(out.read_text())
        total = sum(r["images_per_s"] for r in ranks)
        rows.append(
            {
                "processes": procs,
                "images_per_s_total": total,
                "images_per_s_per_process": total / procs,
            }
        )
    for row in rows:
        row["efficiency"] = row["images_per_s_total"] / (
            row["processes"] * rows[0]["images_per_s_total"]
        )
    return {
        "machine": machine_info(),
        "config": {"file": config, "mode": mode, "overrides": list(overrides), "steps": steps},
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None, suite: str = "train") -> int:
    parser = argparse.ArgumentParser(
        prog=f"dist-reid bench {suite}", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument(
        "--modes", default="baseline,optimized", help=f"comma-separated, from {sorted(MODES)}"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-procs", type=int, default=2, help="scaling: 1..N processes")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument(
        "--worker", help=argparse.SUPPRESS
    )  # internal: one scaling point under torchrun
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.worker:
        res = measure(args.config, [*args.overrides, *MODES[args.modes]], args.steps, args.warmup)
        if res["main"]:
            Path(args.worker).write_text(json.dumps(res["ranks"]))
        return 0
    if suite == "scaling":
        payload = run_scaling_benchmark(
            args.config,
            args.max_procs,
            args.overrides,
            args.steps,
            args.warmup,
            args.modes.split(",")[-1],
        )
    else:
        payload = run_train_benchmark(
            args.config, args.modes.split(","), args.overrides, args.steps, args.warmup
        )
    json_path, md_path = write_report(f"{suite}_throughput", payload, args.out)
    print(markdown_table(payload["rows"]), end="")
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
