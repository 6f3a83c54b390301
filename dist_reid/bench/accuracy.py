"""``dist-reid bench accuracy``: every method trained at one fixed budget, scored beside chance.

Each (method, dataset) pair is trained through the real launcher and engine (``torchrun`` with
``--processes`` local processes; gloo on CPU, NCCL on GPUs), then its last epoch is scored on
the dataset's full test protocol by the evaluator, which also ranks the same queries and
galleries by random distances (the chance row). The default presets are CPU-sized
(``configs/experiments/accuracy/<dataset>_<method>.yaml``: ResNet-18 two-stream / a tiny ViT,
128x64, random init, synthetic trees, the same epochs, batch and optimiser for every method);
``--full`` trains the paper presets (``configs/<dataset>/<method>.yaml``) instead, for a GPU.

Rows: method, dataset, setting, R1 / mAP / mINP (%, mean over trials), the chance level of each,
R1 as a multiple of chance, training and total wall time. Written as ``accuracy.json`` and
``accuracy.md`` (``--out``), with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dist_reid.bench.common import machine_info, markdown_table, write_report

METHODS = ("agw", "pdm", "icre", "emif", "mip")
DATASETS = ("sysu", "regdb")
REPORTED = ("R1", "mAP", "mINP")
_REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def preset_path(
    method: str, dataset: str, full: bool = False, config_dir: Path = _REPO_CONFIGS
) -> Path:
    """The CPU-sized benchmark preset, or with ``full`` the paper preset, of (method, dataset)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if full:
        return config_dir / dataset / f"{method}.yaml"
    return config_dir / "experiments" / "accuracy" / f"{dataset}_{method}.yaml"


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("torchvision", "timm", "accelerate", "dist_reid"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", None)
        except ImportError:
            out[name] = None
    return out


def train_and_score(
    config: Path,
    overrides: Sequence[str],
    processes: int,
    log_path: Path,
) -> dict[str, Any]:
    """Train ``config`` on ``processes`` local processes, then score its last epoch.

    Returns the resolved config's essentials, the evaluator's report dict (with the chance rows)
    and wall times. The training log goes to ``log_path``; a failed run raises with its tail.
    """
    from rich.console import Console

    from dist_reid.builders import ensure_synthetic
    from dist_reid.config import load_config
    from dist_reid.engine.cpu_threads import threads_per_process
    from dist_reid.engine.evaluate import run_evaluation

    cfg = load_config(config, overrides)
    start = time.perf_counter()
    ensure_synthetic(cfg)  # once, before the ranks start: they share the tree
    threads = threads_per_process({**os.environ, "LOCAL_WORLD_SIZE": str(processes)})
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(processes),
        "-m", "dist_reid.engine.run", "--config", str(config), *overrides,
    ]  # fmt: skip
    log_path.parent.mkdir(parents=True, exist_ok=True)
    train_start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    train_s = time.perf_counter() - train_start
    if code != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"training {config} failed (exit {code}); log {log_path}:\n{tail}")
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    with open(log_path, "a", encoding="utf-8") as log:
        report = run_evaluation(
            cfg,
            checkpoint=str(run_dir / "last.pt"),
            console=Console(file=log, width=132),
            out_dir=run_dir / "eval" / "accuracy",
        )
    return {
        "cfg": cfg,
        "report": report.to_dict(),
        "train_s": train_s,
        "total_s": time.perf_counter() - start,
        "steps": json.loads((run_dir / "final_metrics.json").read_text()).get("global_step"),
    }


def backbone_label(cfg: Any) -> str:
    """The backbone as built: a ViT cut down by ``depth`` / ``embed_dim`` options says so."""
    options = cfg.model.options or {}
    size = [f"{key} {options[key]}" for key in ("depth", "embed_dim") if key in options]
    return f"{cfg.model.backbone} ({', '.join(size)})" if size else str(cfg.model.backbone)


def rows_of(method: str, dataset: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per evaluated setting of one run."""
    cfg = result["cfg"]
    rows = []
    for setting, entry in result["report"]["settings"].items():
        mean, chance = entry["mean"], entry["chance"]
        row: dict[str, Any] = {"method": method, "dataset": dataset, "setting": setting}
        for name in REPORTED:
            row[name] = mean[name]
            row[f"{name}_chance"] = chance.get(name)
        row["R1_x_chance"] = mean["R1"] / chance["R1"] if chance.get("R1") else None
        row["trials"] = len(entry["trials"])
        row["backbone"] = backbone_label(cfg)
        row["input"] = f"{cfg.data.height}x{cfg.data.width}"
        row["epochs"] = cfg.train.epochs
        row["steps"] = result["steps"]
        row["train_s"] = result["train_s"]
        row["total_s"] = result["total_s"]
        rows.append(row)
    return rows


def run_accuracy_benchmark(
    methods: Sequence[str],
    datasets: Sequence[str],
    *,
    full: bool = False,
    processes: int = 2,
    out: str | Path = "runs/bench",
    overrides: Sequence[str] = (),
    config_dir: Path = _REPO_CONFIGS,
) -> dict[str, Any]:
    """Train and score every (method, dataset); return the report payload (rows + context)."""
    out = Path(out)
    configs = {
        (m, d): preset_path(m, d, full, config_dir) for d in datasets for m in methods
    }  # every name checked before the first (long) run starts
    rows: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    payload: dict[str, Any] = {"rows": rows, "runs": runs}
    for (method, dataset), config in configs.items():
        name = f"{dataset}_{method}"
        run_overrides = [
            f"run.output_dir={out / 'accuracy_runs'}",
            f"run.name={name}",
            "train.trackers=[]",
            *overrides,
        ]
        print(f"[{name}] training {config} on {processes} processes ...", flush=True)
        result = train_and_score(
            config, run_overrides, processes, out / "accuracy_runs" / f"{name}.log"
        )
        new = rows_of(method, dataset, result)
        rows += new
        for row in new:
            print(
                f"[{name}] {row['setting']}: R1 {row['R1']:.2f} (chance {row['R1_chance']:.2f}, "
                f"{row['R1_x_chance']:.1f}x)  mAP {row['mAP']:.2f}  mINP {row['mINP']:.2f}  "
                f"train {row['train_s']:.0f} s",
                flush=True,
            )
        cfg = result["cfg"]
        runs[name] = {
            "config": str(config),
            "overrides": run_overrides,
            "data_root": cfg.data.root,
            "synthetic": cfg.data.synthetic.enabled,
            "pretrained": cfg.model.pretrained,
            "optimizer": cfg.optim.name,
            "lr": cfg.train.lr,
            "ids_per_batch": cfg.train.ids_per_batch,
            "instances_per_modality": cfg.train.instances_per_modality,
            "report": result["report"],
        }
        # Written after every run: a benchmark stopped part-way keeps its finished rows.
        payload = {
            "machine": machine_info(),
            "versions": _versions(),
            "budget": {
                "presets": "paper (--full)" if full else "CPU-sized (configs/experiments/accuracy)",
                "processes": processes,
                "overrides": list(overrides),
            },
            "rows": rows,
            "runs": runs,
        }
        write_accuracy_report(payload, out)
    return payload


def write_accuracy_report(payload: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``accuracy.json`` (everything, per-run protocol reports included) and ``accuracy.md``
    (the table, machine, versions and budget; the per-trial figures stay in the JSON)."""
    json_path, md_path = write_report(
        "accuracy", {k: v for k, v in payload.items() if k != "runs"}, out
    )
    data = json.loads(json_path.read_text())
    data["runs"] = payload["runs"]
    json_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return json_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dist-reid bench accuracy", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated")
    parser.add_argument(
        "--full", action="store_true", help="the paper presets (configs/<dataset>/<method>.yaml)"
    )
    parser.add_argument("--processes", type=int, default=2, help="local training processes")
    parser.add_argument("--out", default="runs/bench", help="report and run directory")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    args = parser.parse_args(argv)
    if args.processes < 1:
        raise ValueError(f"--processes must be >= 1, got {args.processes}")
    payload = run_accuracy_benchmark(
        [m for m in args.methods.split(",") if m],
        [d for d in args.datasets.split(",") if d],
        full=args.full,
        processes=args.processes,
        out=args.out,
        overrides=args.overrides,
    )
    json_path, md_path = write_accuracy_report(payload, args.out)
    print(markdown_table(payload["rows"]), end="")
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
