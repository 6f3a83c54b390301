"""``dist-reid bench gpu``: one prepared run, on one GPU, of everything not yet measured there.

Each part is a child process with its own time limit (the parts' limits add up to the budget,
8 minutes by default), so a part that fails or runs long costs only its own row:

* ``gpu_tests``: ``pytest -m gpu`` with compiled Triton kernels (``TRITON_INTERPRET=0``);
* ``train``: ``bench train``, baseline against optimised mode, AGW ResNet-50 at 288x144 with
  the paper's per-GPU batch (8 identities x 4 images x 2 modalities); the optimised mode is
  bf16, channels_last, DALI ``mixed`` decoding, fused kernels and the fused optimiser when apex
  is installed. GPU utilisation is sampled with ``nvidia-smi`` while it runs;
* ``loader``: ``bench loader``, DALI mixed against the torch DataLoader with 8 workers;
* ``kernels``: ``bench kernels --quick`` in bf16, with the ``torch.compile`` column;
* ``methods``: ``bench methods``, the methods table's GPU column.

It writes ``gpu.json`` and ``gpu.md`` (the card, driver, CUDA, torch and triton versions, one
row per part with its status, seconds and headline figures, then every part's own table) and
each part's files under ``<out>/<part>/``. Without a CUDA device every part is skipped, the
report says so, and the command exits 0 within seconds: CI runs it that way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_reid.bench.common import machine_info, markdown_table

REPO = Path(__file__).resolve().parents[2]
AGW_PAPER_BATCH = (
    "model.backbone=resnet50",
    "model.pretrained=null",  # throughput only: the weights' values do not matter
    "data.height=288",
    "data.width=144",
    "train.ids_per_batch=8",
    "train.instances_per_modality=4",
)


@dataclass
class Part:
    """One child command of the suite; ``summarise`` turns its report folder into headlines."""

    name: str
    argv: Callable[[Path], list[str]]
    timeout_s: int
    summarise: Callable[[Path], dict[str, Any]] = lambda folder: {}
    env: dict[str, str] = field(default_factory=dict)
    sample_gpu: bool = False


def _bench(*args: str) -> list[str]:
    return [sys.executable, "-m", "dist_reid", "bench", *args]


def _payload(folder: Path, name: str) -> dict[str, Any]:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _summarise_tests(folder: Path) -> dict[str, Any]:
    report = folder / "junit.xml"
    if not report.is_file():
        return {}
    suites = ET.parse(report).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def _summarise_train(folder: Path) -> dict[str, Any]:
    rows = _payload(folder, "train_throughput").get("rows", [])
    out = {f"{r['mode']}_images_per_s": r.get("images_per_s") for r in rows}
    out |= {f"{r['mode']}_peak_mib": r.get("peak_mib") for r in rows if "peak_mib" in r}
    optimised = next((r for r in rows if r["mode"] == "optimized"), None)
    if optimised:
        out["speedup_vs_baseline"] = optimised.get("speedup_vs_baseline")
    return out


def _summarise_loader(folder: Path) -> dict[str, Any]:
    payloads = [json.loads(p.read_text()) for p in folder.glob("loader_*.json")]
    rows = [r for p in payloads for r in p.get("rows", [])]
    best = {}
    for row in rows:
        name = row["loader"]
        best[name] = max(best.get(name, 0.0), row.get("images_per_s") or 0.0)
    out = {f"{k}_images_per_s": v for k, v in best.items()}
    if best.get("torch") and best.get("dali"):
        out["dali_vs_torch"] = best["dali"] / best["torch"]
    return out


def _summarise_kernels(folder: Path) -> dict[str, Any]:
    rows = _payload(folder, "kernels").get("rows", [])
    out: dict[str, Any] = {}
    for row in rows:
        if row.get("provider", "").startswith("triton") and row.get("speedup"):
            key = f"{row['op']}_speedup_range"
            low, high = out.get(key, (row["speedup"], row["speedup"]))
            out[key] = (min(low, row["speedup"]), max(high, row["speedup"]))
    return out


def _summarise_methods(folder: Path) -> dict[str, Any]:
    rows = _payload(folder, "methods").get("rows", [])
    return {r.get("method", "?"): {k: v for k, v in r.items() if "gpu" in k} for r in rows}


def default_parts() -> list[Part]:
    """The suite; the time limits add up to 480 s."""
    return [
        Part(
            "gpu_tests",
            lambda out: [
                sys.executable,
                "-m",
                "pytest",
                str(REPO / "tests"),
                "-m",
                "gpu",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                f"--junitxml={out / 'junit.xml'}",
            ],
            120,
            _summarise_tests,
            env={"TRITON_INTERPRET": "0"},
        ),
        Part(
            "train",
            lambda out: _bench(
                "train",
                "--modes",
                "baseline,optimized",
                "--steps",
                "20",
                "--warmup",
                "5",
                "--out",
                str(out),
                *AGW_PAPER_BATCH,
                "data.num_workers=8",
            ),
            150,
            _summarise_train,
            sample_gpu=True,
        ),
        Part(
            "loader",
            lambda out: _bench(
                "loader",
                "--loaders",
                "torch,dali",
                "--workers",
                "8",
                "--batches",
                "30",
                "--device",
                "cuda",
                "--out",
                str(out),
            ),
            60,
            _summarise_loader,
        ),
        Part(
            "kernels",
            lambda out: _bench(
                "kernels",
                "--quick",
                "--dtype",
                "bfloat16",
                "--compile",
                "--topk",
                "none",
                "--out",
                str(out),
            ),
            90,
            _summarise_kernels,
        ),
        Part(
            "methods",
            lambda out: _bench("methods", "--steps", "5", "--out", str(out)),
            60,
            _summarise_methods,
        ),
    ]


class GpuSampler:
    """Polls ``nvidia-smi`` (utilisation %, memory MiB) every ``interval_s`` in a thread."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-i", "0"]  # fmt: skip
        while not self._stop.wait(self.interval_s):
            try:
                text = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                util, mem = (float(v) for v in text.strip().split(","))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                continue
            self.samples.append((util, mem))

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {}
        util = [u for u, _ in self.samples]
        return {
            "gpu_util_mean_pct": sum(util) / len(util),
            "gpu_util_max_pct": max(util),
            "gpu_mem_max_mib": max(m for _, m in self.samples),
            "gpu_samples": len(util),
        }


def gpu_details() -> dict[str, Any]:
    """Card, driver and library versions for the report (empty values without a GPU)."""
    info: dict[str, Any] = {"driver": None, "cuda": None, "triton": None, "gpu_memory_mib": None}
    try:
        import torch

        info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader,nounits", "-i", "0"]  # fmt: skip
        try:
            text = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
            driver, memory = (v.strip() for v in text.strip().split(","))
            info["driver"], info["gpu_memory_mib"] = driver, float(memory)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
    return info


def run_part(part: Part, out: Path, timeout_s: float) -> dict[str, Any]:
    """Run one part as a child process under ``timeout_s``; never raises for the part's fault."""
    folder = out / part.name
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), **part.env}
    row: dict[str, Any] = {"part": part.name, "status": None, "seconds": None, "limit_s": timeout_s}
    start = time.perf_counter()
    with GpuSampler() if part.sample_gpu else _NoSampler() as sampler:
        try:
            proc = subprocess.run(
                part.argv(folder), cwd=REPO, env=env, capture_output=True, text=True,
                timeout=timeout_s,
            )  # fmt: skip
            row["status"] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            row["status"] = f"timed out after {timeout_s:.0f} s"
            log = "".join(
                s.decode(errors="replace") if isinstance(s, bytes) else (s or "")
                for s in (exc.stdout, exc.stderr)
            )
    row["seconds"] = round(time.perf_counter() - start, 1)
    (folder / "log.txt").write_text(log)
    try:
        row["figures"] = part.summarise(folder) | sampler.summary()
    except (OSError, ValueError, KeyError, ET.ParseError) as exc:
        row["figures"] = {"summary_error": f"{type(exc).__name__}: {exc}"}
    if row["status"] != "ok":
        row["log_tail"] = log.strip().splitlines()[-5:]
    return row


class _NoSampler:
    def __enter__(self) -> _NoSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def summary(self) -> dict[str, Any]:
        return {}


def run_gpu_suite(
    out: str | Path,
    parts: Sequence[Part] | None = None,
    budget_s: float = 480.0,
    cuda: bool | None = None,
) -> dict[str, Any]:
    """Run ``parts`` (default: :func:`default_parts`) within ``budget_s`` in all and write
    ``gpu.json`` / ``gpu.md`` under ``out``. ``cuda`` (default: detected) False skips them all."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    parts = list(default_parts() if parts is None else parts)
    deadline = time.perf_counter() + budget_s
    rows = []
    for part in parts:
        left = deadline - time.perf_counter()
        if not cuda:
            rows.append({"part": part.name, "status": "skipped: no CUDA device", "seconds": 0.0})
        elif left < 1:
            rows.append({"part": part.name, "status": "skipped: budget spent", "seconds": 0.0})
        else:
            rows.append(run_part(part, out, min(part.timeout_s, left)))
    payload = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": machine_info() | gpu_details(),
        "budget_s": budget_s,
        "rows": rows,
    }
    (out / "gpu.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "gpu.md").write_text(_markdown(payload, out))
    return payload


def _markdown(payload: dict[str, Any], out: Path) -> str:
    m = payload["machine"]
    lines = [
        f"# GPU run, {payload['date']}",
        "",
        f"{m.get('cuda_device') or 'no CUDA device'}; driver {m.get('driver')}, CUDA "
        f"{m.get('cuda')}, torch {m.get('torch')}, triton {m.get('triton')}; "
        f"{m.get('processor')} ({m.get('cpus_usable')} usable cores).",
        "",
    ]
    table = [
        {"part": r["part"], "status": r["status"], "seconds": r["seconds"],
         "figures": json.dumps(r.get("figures", {}), default=str)}
        for r in payload["rows"]
    ]  # fmt: skip
    lines.append(markdown_table(table))
    for row in payload["rows"]:
        for md in sorted((out / row["part"]).glob("*.md")):
            lines += ["", f"## {row['part']}: {md.name}", "", md.read_text().strip()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dist-reid bench gpu", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", default="runs/bench/gpu", help="report folder")
    parser.add_argument("--budget-s", type=float, default=480.0, help="all parts together")
    parser.add_argument(
        "--parts",
        default=None,
        help="comma-separated subset of gpu_tests,train,loader,kernels,methods",
    )
    args = parser.parse_args(argv)
    parts = default_parts()
    if args.parts:
        wanted = args.parts.split(",")
        unknown = sorted(set(wanted) - {p.name for p in parts})
        if unknown:
            parser.error(f"--parts: unknown {unknown}; choose from {[p.name for p in parts]}")
        parts = [p for p in parts if p.name in wanted]
    payload = run_gpu_suite(args.out, parts, args.budget_s)
    for row in payload["rows"]:
        print(f"{row['part']}: {row['status']} ({row['seconds']} s) {row.get('figures', '')}")
    print(f"wrote {Path(args.out) / 'gpu.json'} and {Path(args.out) / 'gpu.md'}")
    fine = all(r["status"] == "ok" or r["status"].startswith("skipped") for r in payload["rows"])
    return 0 if fine else 1


if __name__ == "__main__":
    raise SystemExit(main())
