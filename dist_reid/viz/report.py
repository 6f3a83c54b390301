"""Figures for a trained model and a markdown/HTML report for a finished run directory."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

from dist_reid.viz.plots import plot_cmc

log = logging.getLogger(__name__)


def training_curves(run_dir: str | Path, path: str | Path) -> Path | None:
    """Loss terms and learning rate from the run's TensorBoard events, one panel each."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = Path(run_dir) / "tensorboard"
    if not events.is_dir():
        return None
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    tags = [
        t
        for t in accumulator.Tags().get("scalars", [])
        if t.startswith(("loss/", "lr")) or (t.startswith("eval/") and t.endswith(("/R1", "/mAP")))
    ]
    if not tags:
        return None
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tags), 1, figsize=(6, max(2.6, 1.8 * len(tags))), squeeze=False)
    for ax, tag in zip(axes[:, 0], tags, strict=True):
        points = accumulator.Scalars(tag)
        # markers: an evaluation scalar may be a single point (one evaluated epoch)
        ax.plot([p.step for p in points], [p.value for p in points], marker="o", markersize=2)
        ax.set_ylabel(tag, fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_labels(run_dirs: list[str | Path]) -> list[str]:
    """The shortest trailing path of each run that tells it apart from the others (the folder
    name when those differ, else ``parent/name``, ...), so equal names stay separate curves."""
    parts = [Path(run).resolve().parts for run in run_dirs]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(map(len, parts)):
            return labels
        depth += 1


def compare_cmc(run_dirs: list[str | Path], path: str | Path, setting: str | None = None) -> Path:
    """CMC curves (trial means) of several runs' ``metrics.json`` on one plot."""
    curves: dict[str, list[float]] = {}
    labels = dict(zip(run_dirs, run_labels(run_dirs), strict=True))
    for run in run_dirs:
        metrics_file = Path(run) / "metrics.json"
        if not metrics_file.is_file():
            raise FileNotFoundError(
                f"{metrics_file} not found: run 'dist-reid eval' on {run} first"
            )
        settings = json.loads(metrics_file.read_text())["settings"]
        for name, entry in settings.items():
            if (setting is None or name == setting) and entry.get("cmc_mean"):
                curves[f"{labels[run]}/{name}"] = entry["cmc_mean"]
    if not curves:
        raise ValueError(
            f"no CMC curves for setting {setting!r} in {', '.join(map(str, run_dirs))}"
        )
    return plot_cmc(curves, path, title="CMC (mean over trials)")


def _table(settings: dict[str, Any]) -> str:
    """Mean ± std per metric; the mean alone where no spread was recorded (a spread of 0 must
    not be printed for one that is unknown)."""
    names = ("R1", "R5", "R10", "R20", "mAP", "mINP")
    lines = ["| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for setting, entry in settings.items():
        mean, std = entry["mean"], entry.get("std") or {}
        cells = [f"{mean[n]:.2f} ± {std[n]:.2f}" if n in std else f"{mean[n]:.2f}" for n in names]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
        if entry.get("chance"):
            lines.append(
                f"| {setting} (chance) | "
                + " | ".join(f"{entry['chance'][n]:.2f}" for n in names)
                + " |"
            )
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` in the run directory: metrics, curves, figures."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    parts = [f"# Report: {run.name}\n"]
    final = run / "final_metrics.json"
    if final.is_file():
        data = json.loads(final.read_text())
        last = data.get("last_epoch")
        if last:
            parts.append(f"Last epoch ({last['epoch']}), mean over trials, %:\n")
            parts.append(_table({k: {"mean": v} for k, v in last["metrics"].items()}) + "\n")
        best = data.get("best_epoch_selected_on_test_set_optimistic")
        if best:
            parts.append(
                f"Best epoch {best['epoch']} by {best['selected_by']} — chosen on the test set, so optimistic "
                "(reported for comparison with papers that do the same).\n"
            )
    metrics = run / "metrics.json"
    if metrics.is_file():
        data = json.loads(metrics.read_text())
        parts.append(f"## Full protocol ({data['dataset']}), mean ± std over trials, %\n")
        parts.append(_table(data["settings"]) + "\n")
        if "post_processed" in data:
            parts.append("### Post-processed (re-ranking / query expansion), reported apart\n")
            parts.append(_table(data["post_processed"]["settings"]) + "\n")
        curves = {k: v["cmc_mean"] for k, v in data["settings"].items() if v.get("cmc_mean")}
        if curves:
            plot_cmc(curves, run / "figures" / "cmc.png")
    curves_png = (
        training_curves(run, run / "figures" / "training_curves.png")
        if (run / "tensorboard").is_dir()
        else None
    )
    if curves_png is not None:
        parts.append("## Training curves\n\n![training curves](figures/training_curves.png)\n")
    figures = sorted((run / "figures").glob("*.png")) if (run / "figures").is_dir() else []
    for figure in figures:
        if figure.name != "training_curves.png":
            parts.append(
                f"## {figure.stem.replace('_', ' ')}\n\n![{figure.stem}](figures/{figure.name})\n"
            )
    markdown = "\n".join(parts)
    md_path = run / "report.md"
    md_path.write_text(markdown)
    html_path = run / "report.html"
    html_path.write_text(_html(markdown, run.name, run))
    return md_path, html_path


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html(markdown: str, title: str, base: Path) -> str:
    """A dependency-free rendering of the report's small markdown subset, as one file: images
    are embedded (data URIs), so the page can be attached or copied off a cluster alone."""
    import html

    out, table = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                table.append(cells)
            continue
        if table:
            head, *body = table
            out.append(
                "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
            )
            out += [
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in body
            ]
            out.append("</table>")
            table = []
        if line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            uri = _data_uri(base / src.rstrip(")"))
            out.append(f'<img alt="{html.escape(alt)}" src="{uri}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    style = "body{font-family:sans-serif;max-width:960px;margin:auto}td,th{border:1px solid #ccc;padding:3px 6px}table{border-collapse:collapse}img{max-width:100%}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(out)}</body></html>"
