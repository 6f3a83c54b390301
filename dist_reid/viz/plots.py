"""CMC curves, cross-modal distance histograms, t-SNE maps, ranked galleries, Grad-CAM."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from dist_reid.data.images import load_rgb
from dist_reid.data.records import Record


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cmc(curves: Mapping[str, Sequence[float]], path: str | Path, title: str = "CMC") -> Path:
    """One line per method/trial/setting: matching rate (%) against rank."""
    return _save(cmc_figure(curves, title), path)


def cmc_figure(curves: Mapping[str, Sequence[float]], title: str = "CMC") -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, curve in curves.items():
        ranks = np.arange(1, len(curve) + 1)
        ax.plot(
            ranks,
            100 * np.asarray(curve),
            marker="o",
            markersize=3,
            label=f"{name} (R1 {100 * curve[0]:.1f})",
        )
    ax.set_xlabel("rank")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # ranks are whole numbers
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return fig


def cross_modal_distances(
    distmat: np.ndarray, query_ids: np.ndarray, gallery_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(intra-class, inter-class) entries of a query x gallery (cross-modal) distance matrix."""
    same = np.asarray(query_ids)[:, None] == np.asarray(gallery_ids)[None, :]
    return distmat[same], distmat[~same]


def plot_distance_histogram(
    distmat: np.ndarray,
    query_ids: np.ndarray,
    gallery_ids: np.ndarray,
    path: str | Path,
    title: str = "",
    xlabel: str = "cross-modal distance",
) -> Path:
    """Intra- vs inter-class cross-modal distance distributions with their means (the seed
    papers' distance-distribution figure)."""
    return _save(distance_figure(distmat, query_ids, gallery_ids, title, xlabel), path)


def distance_figure(
    distmat: np.ndarray,
    query_ids: np.ndarray,
    gallery_ids: np.ndarray,
    title: str = "",
    xlabel: str = "cross-modal distance",
) -> Figure:
    intra, inter = cross_modal_distances(distmat, query_ids, gallery_ids)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(min(intra.min(), inter.min()), max(intra.max(), inter.max()), 50)
    for values, name, color in (
        (intra, "intra-class", "tab:green"),
        (inter, "inter-class", "tab:red"),
    ):
        ax.hist(
            values,
            bins=bins,
            density=True,
            alpha=0.55,
            color=color,
            label=f"{name} (mean {values.mean():.3f})",
        )
        ax.axvline(values.mean(), color=color, linestyle="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend()
    ax.set_title(title or "cross-modal distances")
    return fig


def tsne_embedding(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ImportError("t-SNE needs scikit-learn: pip install -e '.[viz]'") from None
    perplexity = min(perplexity, max(2.0, (len(features) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(
        features
    )


def plot_tsne(
    features: np.ndarray,
    ids: Sequence[int],
    modalities: Sequence[str],
    path: str | Path,
    max_ids: int = 20,
    seed: int = 0,
) -> Path:
    """t-SNE of test features: colour = identity, marker = modality (o visible, ^ infrared)."""
    ids = np.asarray(ids)
    chosen = np.unique(ids)[:max_ids]
    keep = np.isin(ids, chosen)
    points = tsne_embedding(features[keep], seed=seed)
    mods = np.asarray(modalities)[keep]
    colors = plt.get_cmap("tab20")(np.searchsorted(chosen, ids[keep]) % 20)
    fig, ax = plt.subplots(figsize=(6, 6))
    for modality, marker in (("visible", "o"), ("infrared", "^")):
        mask = mods == modality
        ax.scatter(
            points[mask, 0],
            points[mask, 1],
            c=colors[mask],
            marker=marker,
            s=22,
            label=modality,
            edgecolors="none",
        )
    ax.legend()
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE of {keep.sum()} test features ({len(chosen)} identities)")
    return _save(fig, path)


def plot_ranked_gallery(
    query: Sequence[Record],
    gallery: Sequence[Record],
    distmat: np.ndarray,
    query_indices: Sequence[int],
    path: str | Path,
    top_k: int = 10,
    thumb: tuple[int, int] = (128, 64),
) -> Path:
    """For each chosen query, its top-k gallery images; green frame = true match, red = false.
    A gallery shorter than ``top_k`` gets as many columns as it has images."""
    rows = len(query_indices)
    top_k = max(1, min(top_k, distmat.shape[1]))
    fig, axes = plt.subplots(
        rows, top_k + 1, figsize=(1.1 * (top_k + 1), 2.2 * rows), squeeze=False
    )
    for row, qi in enumerate(query_indices):
        order = np.argsort(distmat[qi], kind="stable")[:top_k]
        items = [(query[qi], None)] + [(gallery[g], gallery[g].pid == query[qi].pid) for g in order]
        for col, (record, correct) in enumerate(items):
            ax = axes[row, col]
            image = load_rgb(record.path).resize((thumb[1], thumb[0]), Image.BILINEAR)
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            color = "black" if correct is None else ("limegreen" if correct else "red")
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
            ax.set_title("query" if correct is None else f"{col}", fontsize=7)
    return _save(fig, path)


def grad_cam(
    model: torch.nn.Module, layer: torch.nn.Module, images: torch.Tensor, modality: str
) -> torch.Tensor:
    """Grad-CAM of the embedding norm w.r.t. ``layer``'s activations: (N, H, W) maps in [0, 1]."""
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("act", o))
    try:
        model.eval()
        with torch.enable_grad():
            images = images.clone().requires_grad_(True)
            # embed() is usually wrapped in no_grad for inference; call the undecorated function.
            embed = getattr(type(model).embed, "__wrapped__", type(model).embed)
            embedding = embed(model, images, modality)
            activation = store["act"]
            grads = torch.autograd.grad(embedding.norm(dim=1).sum(), activation)[0]
    finally:
        handle.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1))
    cam = cam / cam.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
    return cam.detach()


def plot_attention(
    images: Sequence[Image.Image], cams: torch.Tensor, path: str | Path, titles: Sequence[str] = ()
) -> Path:
    """Images with their Grad-CAM maps overlaid."""
    fig, axes = plt.subplots(1, len(images), figsize=(1.6 * len(images), 3.2), squeeze=False)
    for i, (image, cam) in enumerate(zip(images, cams, strict=True)):
        ax = axes[0, i]
        ax.imshow(image)
        heat = Image.fromarray(np.uint8(255 * cam.numpy())).resize(image.size, Image.BILINEAR)
        ax.imshow(np.asarray(heat) / 255.0, cmap="jet", alpha=0.45)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles:
            ax.set_title(titles[i], fontsize=7)
    return _save(fig, path)
