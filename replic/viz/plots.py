"""Attention figures (matplotlib, Agg, no pyplot state): heads over the image with the box.

* ``plot_heads``: one panel per head, the map of one query overlaid on the original
  image, with that query's predicted box.
* ``plot_spatial_vs_full``: Conditional DETR's spatial-only maps (row 1) above the full
  cross-attention (row 2), as in the paper's figure.
* ``plot_model_comparison``: DETR and Conditional DETR on the same image, the
  Conditional DETR query and the DETR query whose box overlaps it most.

Every function returns a ``matplotlib.figure.Figure``; ``save_figure`` writes it as a
PNG atomically. Each panel is scaled to its own peak (so a nearly flat map still shows
its shape); the title's ``peak N×`` says how peaked it really is (1× = uniform). Maps are placed with ``attention_to_image`` so they line up with the
original pixels whatever the resize and padding were.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from replic.data.io import atomic_write_bytes
from replic.viz.attention import AttentionResult
from replic.viz.geometry import attention_to_image

PANEL_INCHES = 2.2
DPI = 100
CMAP = "jet"


def _check_image(image: np.ndarray, result: AttentionResult) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    if tuple(image.shape[:2]) != tuple(result.geometry.orig_size):
        raise ValueError(
            f"image is {image.shape[:2]} but the attention was computed for an original size of "
            f"{result.geometry.orig_size}: pass the original (untransformed) image"
        )
    return image


def draw_overlay(
    ax,
    image: np.ndarray,
    attn_map: torch.Tensor | np.ndarray,
    result: AttentionResult,
    box_xyxy: torch.Tensor | None = None,
    title: str = "",
    alpha: float = 0.55,
) -> np.ndarray:
    """Draw the original image, the map resampled onto it, and the box; return the resampled map."""
    h, w = result.geometry.orig_size
    on_image = attention_to_image(attn_map, result.geometry)
    peak = float(on_image.max())
    shown = on_image / peak if peak > 0 else on_image
    ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest")
    ax.imshow(shown, extent=(0, w, h, 0), cmap=CMAP, alpha=alpha, vmin=0.0, vmax=1.0,
              interpolation="bilinear")
    if box_xyxy is not None:
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.5))
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="black",
                               linewidth=0.6, linestyle="--"))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    return on_image


def _figure(rows: int, cols: int, aspect: float) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES * aspect + 0.5), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def head_title(maps: torch.Tensor, result: AttentionResult, query: int, head: int) -> str:
    """``head h · peak N×`` where N is the map's peak over a uniform map's value (1× = flat)."""
    valid = int((~result.key_padding).sum())
    peak = float(maps[query, head].max()) * max(valid, 1)
    return f"head {head} · peak {peak:.1f}×"


def _query_label(result: AttentionResult, query: int) -> str:
    return (
        f"image {result.image_id} · layer {result.layer} · query {int(result.query_indices[query])} "
        f"(class {int(result.labels[query])}, score {float(result.scores[query]):.2f})"
    )


def plot_heads(
    image: np.ndarray, result: AttentionResult, query: int = 0, spatial: bool = False, model_name: str = ""
) -> Figure:
    """Per-head maps of the ``query``-th selected query overlaid on the image, with its box."""
    image = _check_image(image, result)
    maps = result.cross_attn_spatial if spatial else result.cross_attn
    if maps is None:
        raise ValueError("spatial=True, but this model has no spatial-only attention (DETR)")
    m = result.num_heads
    cols = min(m, 4)
    rows = -(-m // cols)
    h, w = result.geometry.orig_size
    fig, axes = _figure(rows, cols, h / w)
    for head in range(rows * cols):
        ax = axes.flat[head]
        if head >= m:
            ax.axis("off")
            continue
        title = head_title(maps, result, query, head)
        draw_overlay(ax, image, maps[query, head], result, result.boxes_xyxy[query], title)
    kind = "spatial-only attention" if spatial else "cross-attention"
    fig.suptitle(f"{model_name + ': ' if model_name else ''}{kind}\n{_query_label(result, query)}", fontsize=9)
    return fig


def plot_spatial_vs_full(image: np.ndarray, result: AttentionResult, query: int = 0, model_name: str = "") -> Figure:
    """Spatial-only maps (top row) next to the full cross-attention (bottom row), per head."""
    image = _check_image(image, result)
    if result.cross_attn_spatial is None:
        raise ValueError("this model has no spatial-only attention (cross_attn_spatial); is it DETR?")
    m = result.num_heads
    h, w = result.geometry.orig_size
    fig, axes = _figure(2, m, h / w)
    box = result.boxes_xyxy[query]
    for head in range(m):
        draw_overlay(axes[0, head], image, result.cross_attn_spatial[query, head], result, box,
                     head_title(result.cross_attn_spatial, result, query, head))
        draw_overlay(axes[1, head], image, result.cross_attn[query, head], result, box,
                     head_title(result.cross_attn, result, query, head))
    axes[0, 0].set_ylabel("spatial (q_s·k_p)", fontsize=8)
    axes[1, 0].set_ylabel("full (content + spatial)", fontsize=8)
    fig.suptitle(f"{model_name + ': ' if model_name else ''}{_query_label(result, query)}", fontsize=9)
    return fig


def box_iou_xyxy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU between every box of ``a`` (N, 4) and ``b`` (M, 4), absolute xyxy."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def matching_query(result: AttentionResult, box_xyxy: torch.Tensor) -> int:
    """Index (among ``result``'s selected queries) of the box overlapping ``box_xyxy`` most."""
    return int(box_iou_xyxy(result.boxes_xyxy, box_xyxy[None]).squeeze(1).argmax())


def plot_model_comparison(
    image: np.ndarray,
    detr: AttentionResult,
    conditional: AttentionResult,
    query: int = 0,
    names: tuple[str, str] = ("DETR", "Conditional DETR"),
) -> Figure:
    """DETR vs Conditional DETR on the same image, per head.

    Rows: DETR full cross-attention; Conditional DETR full cross-attention; Conditional
    DETR spatial-only attention (when available). The Conditional DETR query is its
    ``query``-th selected one; the DETR query is the one of DETR's selected queries
    whose box overlaps it most, so both rows look at the same object.
    """
    image = _check_image(image, conditional)
    _check_image(image, detr)
    detr_query = matching_query(detr, conditional.boxes_xyxy[query])
    m = max(detr.num_heads, conditional.num_heads)
    rows_spec = [
        (detr, detr.cross_attn, detr_query, f"{names[0]} full"),
        (conditional, conditional.cross_attn, query, f"{names[1]} full"),
    ]
    if conditional.cross_attn_spatial is not None:
        rows_spec.append((conditional, conditional.cross_attn_spatial, query, f"{names[1]} spatial"))
    h, w = conditional.geometry.orig_size
    fig, axes = _figure(len(rows_spec), m, h / w)
    for r, (res, maps, q, label) in enumerate(rows_spec):
        for head in range(m):
            ax = axes[r, head]
            if head >= res.num_heads:
                ax.axis("off")
                continue
            draw_overlay(ax, image, maps[q, head], res, res.boxes_xyxy[q], head_title(maps, res, q, head))
        axes[r, 0].set_ylabel(f"{label}\nq{int(res.query_indices[q])} s={float(res.scores[q]):.2f}", fontsize=8)
    fig.suptitle(f"image {conditional.image_id} · layer {conditional.layer}", fontsize=9)
    return fig


def figure_png_bytes(fig: Figure) -> bytes:
    """Render a figure to PNG bytes (no timestamp metadata, so equal figures give equal bytes)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path``, atomically; return the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figures are written as PNG; got {path}")
    atomic_write_bytes(path, figure_png_bytes(fig))
    return path
