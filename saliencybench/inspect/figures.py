"""PNG figures of the inspection tools (matplotlib, Agg backend).

Every writer takes results (tensors, dataclasses), writes one or two PNG files into
``out_dir`` (created if missing) and returns their paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.offsetbox import AnnotationBbox, OffsetImage  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from .classvis import ClassVisualisation  # noqa: E402
from .features import TopActivation  # noqa: E402

DPI = 110


def _hwc(image: torch.Tensor) -> np.ndarray:
    """Tensor[3,H,W] in [0,1] -> numpy array [H,W,3] for imshow."""
    return image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()


def _save(fig: plt.Figure, out_dir: str | Path, name: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _frame(ax: plt.Axes, colour: str | None = None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(colour is not None)
        if colour is not None:
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)


def write_filters(grid: torch.Tensor, out_dir: str | Path, title: str = "first convolution filters") -> Path:
    """The filter grid Tensor[3,H,W] (from :func:`filter_grid`) as ``filters.png``."""
    h, w = grid.shape[-2:]
    fig, ax = plt.subplots(figsize=(max(3.0, w / 12), max(3.0, h / 12)))
    ax.imshow(_hwc(grid), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    _frame(ax)
    return _save(fig, out_dir, "filters.png")


def write_activation_maps(images: torch.Tensor, maps: torch.Tensor, out_dir: str | Path, title: str = "") -> Path:
    """Images Tensor[B,3,H,W] in [0,1] and a channel's maps Tensor[B,h,w] as ``activations.png``.

    One column per image: the image, the map (its own colour scale, shared over the
    images), and the map upsampled bilinearly over the image.
    """
    b = len(images)
    lo, hi = float(maps.min()), float(maps.max())
    up = F.interpolate(maps[:, None].float(), size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    fig, axes = plt.subplots(3, b, figsize=(1.6 * b + 0.6, 5), squeeze=False)
    for n in range(b):
        axes[0, n].imshow(_hwc(images[n]))
        im = axes[1, n].imshow(maps[n].float().cpu().numpy(), cmap="viridis", vmin=lo, vmax=hi,
                               interpolation="nearest")
        axes[2, n].imshow(_hwc(images[n]))
        axes[2, n].imshow(up[n].cpu().numpy(), cmap="jet", alpha=0.5, vmin=lo, vmax=hi)
        axes[1, n].set_title(f"max {float(maps[n].max()):.2f}", fontsize=7)
        for r in range(3):
            _frame(axes[r, n])
    fig.colorbar(im, ax=axes[1, :].tolist(), fraction=0.02)
    fig.suptitle(title, fontsize=9)
    return _save(fig, out_dir, "activations.png")


def write_top_activating(tops: Sequence[TopActivation], out_dir: str | Path, title: str = "",
                         classes: Sequence[str] | None = None) -> Path:
    """Top activating images with the receptive field of their maximum (top row) and its crop
    (bottom row), as ``top_activating.png``."""
    k = max(1, len(tops))
    fig, axes = plt.subplots(2, k, figsize=(1.7 * k, 3.8), squeeze=False)
    for n, t in enumerate(tops):
        axes[0, n].imshow(_hwc(t.image))
        x1, y1, x2, y2 = t.box
        axes[0, n].add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor="red", lw=1.5))
        name = classes[t.label] if classes and 0 <= t.label < len(classes) else str(t.label)
        axes[0, n].set_title(f"#{t.index} {name}\n{t.value:.2f}", fontsize=7)
        axes[1, n].imshow(_hwc(t.patch), interpolation="nearest")
        for r in range(2):
            _frame(axes[r, n])
    fig.suptitle(title, fontsize=9)
    return _save(fig, out_dir, "top_activating.png")


def write_class_visualisation(result: ClassVisualisation, out_dir: str | Path, title: str = "") -> Path:
    """The optimised image and the objective over the steps, as ``class_visualisation.png``."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.6), gridspec_kw={"width_ratios": [1, 1.3]})
    a.imshow(_hwc(result.image))
    _frame(a)
    a.set_title(title, fontsize=9)
    b.plot(result.scores.numpy(), lw=1)
    b.axhline(result.initial_score, color="grey", ls=":", lw=1, label=f"start {result.initial_score:.2f}")
    b.axhline(result.final_score, color="red", ls="--", lw=1, label=f"end {result.final_score:.2f}")
    b.set_xlabel("step")
    b.set_ylabel("objective (jittered input)")
    b.legend(fontsize=7)
    return _save(fig, out_dir, "class_visualisation.png")


def write_neighbours(query_images: torch.Tensor, bank_images: torch.Tensor, feature_nn: torch.Tensor,
                     pixel_nn: torch.Tensor, query_labels: torch.Tensor, bank_labels: torch.Tensor,
                     out_dir: str | Path, classes: Sequence[str] | None = None, title: str = "") -> Path:
    """Query images Tensor[Q,3,H,W] with their neighbours from bank_images Tensor[N,3,H,W]
    in feature space (feature_nn LongTensor[Q,k]) and pixel space (pixel_nn LongTensor[Q,k]),
    side by side, frames green where the neighbour shares the query's class; ``neighbours.png``."""
    q, k = feature_nn.shape
    fig, axes = plt.subplots(q, 2 * k + 1, figsize=(0.95 * (2 * k + 1) + 0.3, 1.0 * q + 0.6), squeeze=False)
    for r in range(q):
        label = int(query_labels[r])
        axes[r, 0].imshow(_hwc(query_images[r]))
        _frame(axes[r, 0], "black")
        if classes:
            axes[r, 0].set_ylabel(classes[label], fontsize=7)
        for c, (space, nn_idx) in enumerate((("features", feature_nn), ("pixels", pixel_nn))):
            for j in range(k):
                ax = axes[r, 1 + c * k + j]
                b = int(nn_idx[r, j])
                ax.imshow(_hwc(bank_images[b]))
                _frame(ax, "limegreen" if int(bank_labels[b]) == label else "red")
                if r == 0 and j == 0:
                    ax.set_title(f"{space} (nearest first)", fontsize=8, loc="left")
    axes[0, 0].set_title("query", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, out_dir, "neighbours.png")


def write_tsne(embedding: torch.Tensor, labels: torch.Tensor, out_dir: str | Path, *,
               classes: Sequence[str] | None = None, images: torch.Tensor | None = None,
               max_thumbnails: int = 300, title: str = "") -> list[Path]:
    """t-SNE embedding Tensor[N,2] as a scatter coloured by labels LongTensor[N] (``tsne.png``)
    and, with images Tensor[N,3,H,W] in [0,1], with image thumbnails (``tsne_thumbnails.png``,
    at most ``max_thumbnails`` evenly spaced in data-set order)."""
    e = embedding.float().cpu().numpy()
    lab = labels.cpu().numpy()
    cmap = plt.get_cmap("tab10" if int(lab.max()) < 10 else "tab20")
    fig, ax = plt.subplots(figsize=(6, 5))
    for c in sorted(set(lab.tolist())):
        sel = lab == c
        name = classes[c] if classes and 0 <= c < len(classes) else str(c)
        ax.scatter(e[sel, 0], e[sel, 1], s=10, color=cmap(c % cmap.N), label=name)
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    paths = [_save(fig, out_dir, "tsne.png")]
    if images is not None:
        n = len(images)
        step = max(1, -(-n // max_thumbnails))
        fig, ax = plt.subplots(figsize=(9, 8))
        ax.scatter(e[:, 0], e[:, 1], s=4, c=[cmap(int(c) % cmap.N) for c in lab])
        zoom = 24 / max(images.shape[-2:])
        for i in range(0, n, step):
            box = OffsetImage(_hwc(images[i]), zoom=zoom)
            ax.add_artist(AnnotationBbox(box, (e[i, 0], e[i, 1]), frameon=True, pad=0.1,
                                         bboxprops={"edgecolor": cmap(int(lab[i]) % cmap.N), "lw": 1.5}))
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        paths.append(_save(fig, out_dir, "tsne_thumbnails.png"))
    return paths
