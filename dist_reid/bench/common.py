"""Shared helpers of the ``dist-reid bench`` commands: machine description and report files."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _cpu_name() -> str:
    """CPU model; ``platform.processor()`` is often empty on Linux, so fall back to /proc/cpuinfo."""
    name = platform.processor()
    if name and name not in ("x86_64", "aarch64"):
        return name
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where a benchmark ran, without the hostname (reports get shared).

    Keys: platform, machine, processor, cpu_count, cpus_usable, python, numpy, torch, cuda_device
    (None when torch or CUDA is missing).
    """
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "platform": platform.platform(),  # OS + kernel + libc, no node name
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": None,
        "cuda_device": None,
    }
    try:
        import torch
    except ImportError:
        return info
    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def _jsonable(value: Any) -> Any:
    """json.dump fallback for numpy scalars/arrays and paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def _cell(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{float(value):.6g}"
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")  # keep the table one row per line


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of flat dicts; columns are all keys in order of first appearance."""
    if not rows:
        return "_(no rows)_\n"
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    lines = [
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    lines += ["| " + " | ".join(_cell(row.get(col)) for col in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_report(name: str, payload: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` (the whole payload) and ``<name>.md``; return both paths.

    The markdown holds a table of ``payload["rows"]`` (each a flat dict) followed by every other
    top-level entry (dicts as bullet lists, scalars inline).
    """
    if not name or Path(name).name != name:
        raise ValueError(f"report name must be a plain file stem, got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n", encoding="utf-8")

    parts = [f"# {name}\n", markdown_table(payload.get("rows", []))]
    for key, value in payload.items():
        if key == "rows":
            continue
        if isinstance(value, Mapping):
            parts.append(f"## {key}\n")
            parts.append("".join(f"- {k}: {_cell(v)}\n" for k, v in value.items()))
        else:
            parts.append(f"**{key}**: {_cell(value)}\n")
    md_path.write_text("\n".join(parts), encoding="utf-8")
    return json_path, md_path


__all__ = ["machine_info", "markdown_table", "write_report"]
