"""The two jobs the CLI, the notebook and the workflow share: render figures, measure extremity."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from replic.viz.attention import AttentionResult, extract_attention
from replic.viz.loading import ImageBatch, VizModel, load_images

log = logging.getLogger(__name__)


def attention_for(vm: VizModel, batch: ImageBatch, layer: int = -1, queries: int = 3) -> list[AttentionResult]:
    """Extract the top-``queries`` attention of ``vm`` on ``batch`` (one result per image)."""
    device = next(vm.model.parameters()).device
    return extract_attention(
        vm.model, batch.images.to(device), batch.mask.to(device), batch.targets,
        layer=layer, num_queries=queries, softmax=vm.softmax,
    )  # fmt: skip


def render_attention_figures(
    vm: VizModel,
    batch: ImageBatch,
    out_dir: str | Path,
    layer: int = -1,
    queries: int = 3,
    baseline: VizModel | None = None,
) -> list[Path]:
    """Write the per-head figures of every image in ``batch`` into ``out_dir``; return the paths.

    Per image and selected query: ``heads_full`` (every head's cross-attention over the
    image with the box); for Conditional DETR also ``heads_spatial`` and
    ``spatial_vs_full``; with a ``baseline`` model (e.g. DETR) also ``vs_<baseline>``.
    """
    from replic.viz.plots import (
        plot_heads,
        plot_model_comparison,
        plot_spatial_vs_full,
        save_figure,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = attention_for(vm, batch, layer, queries)
    base_results = attention_for(baseline, batch, layer, max(queries, 10)) if baseline is not None else None
    written: list[Path] = []
    for b, res in enumerate(results):
        image = batch.originals[b]
        tag = f"img{res.image_id}" if res.image_id >= 0 else f"file{-res.image_id}"
        for k in range(len(res.query_indices)):
            stem = out / f"{tag}_layer{res.layer}_rank{k}"
            figures = {"heads_full": plot_heads(image, res, k, spatial=False, model_name=vm.name)}
            if res.cross_attn_spatial is not None:
                figures["heads_spatial"] = plot_heads(image, res, k, spatial=True, model_name=vm.name)
                figures["spatial_vs_full"] = plot_spatial_vs_full(image, res, k, model_name=vm.name)
            if base_results is not None:
                figures[f"vs_{baseline.name}"] = plot_model_comparison(
                    image, base_results[b], res, k, names=(baseline.name, vm.name)
                )
            for suffix, fig in figures.items():
                written.append(save_figure(fig, f"{stem}_{suffix}.png"))
    log.info("wrote %d figures to %s", len(written), out)
    return written


def attention_over_images(
    vm: VizModel, sources: list[str | int], layer: int = -1, queries: int = 5
) -> list[AttentionResult]:
    """Attention of the top ``queries`` on each image of ``sources``, one image per forward pass.

    One image at a time, so no image is padded (the DC5 evaluation protocol).
    """
    results: list[AttentionResult] = []
    for source in sources:
        results.extend(attention_for(vm, load_images([source], vm.data_config), layer, queries))
    return results


def measure_extremity(
    vm: VizModel,
    sources: list[str | int],
    layer: int = -1,
    queries: int = 5,
    band_frac: float = 0.25,
    kind: str = "spatial",
):
    """Per-query rows and the per-head summary (pandas) of ``vm`` over ``sources``."""
    import pandas as pd

    from replic.viz.extremity import extremity_records, summarize_by_head

    results = attention_over_images(vm, sources, layer, queries)
    per_query = pd.DataFrame(extremity_records(results, band_frac=band_frac, kind=kind, run=vm.name))
    return per_query, summarize_by_head(per_query)


def val_sources(vm: VizModel, count: int) -> list[str]:
    """The first ``count`` images of the run's val split, as ``@N`` sources."""
    if count <= 0:
        raise ValueError(f"number of images must be positive, got {count}")
    return [f"@{i}" for i in range(count)]
