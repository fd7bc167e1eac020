"""``replic viz attention`` and ``replic viz extremity``: attention figures and head-extremity tables."""

from __future__ import annotations

import argparse
import logging
from typing import Any

log = logging.getLogger(__name__)


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, metavar="CKPT",
        help="replic run checkpoint (checkpoint_final.pt) or converted official checkpoint",
    )  # fmt: skip
    parser.add_argument(
        "--config", default=None, metavar="CFG",
        help="experiment or run config YAML (default: the one the checkpoint carries or its run's config.yaml)",
    )  # fmt: skip
    parser.add_argument("--scale", default=None, help="scale overlay for --config (smoke|paper|YAML)")
    parser.add_argument("--layer", type=int, default=-1, help="decoder layer, negative from the last (default -1)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def register(subparsers: Any) -> None:
    """Add the ``viz`` command group."""
    viz = subparsers.add_parser("viz", help="decoder attention figures and head-extremity statistics")
    sub = viz.add_subparsers(dest="viz_command", metavar="SUBCOMMAND", required=True)

    attention = sub.add_parser(
        "attention",
        help="per-head cross-attention of the top-scoring queries, overlaid on the image",
        description=(
            "Writes PNGs into OUT: per query, every head's cross-attention over the original image "
            "with the predicted box (heads_full); for Conditional DETR also the spatial-only maps "
            "(heads_spatial) and spatial-only next to full attention (spatial_vs_full); with "
            "--baseline-checkpoint, the baseline (e.g. DETR) side by side (vs_<name>)."
        ),
    )
    _model_args(attention)
    attention.add_argument(
        "--image", required=True, action="append", metavar="PATH_OR_ID",
        help="image file, val-split image id, or @N for the N-th val image (repeatable)",
    )  # fmt: skip
    attention.add_argument("--out", required=True, metavar="DIR", help="output folder")
    attention.add_argument("--queries", type=int, default=3, help="top-scoring queries per image (default 3)")
    attention.add_argument("--baseline-checkpoint", default=None, metavar="CKPT", help="model to compare with")
    attention.add_argument("--baseline-config", default=None, metavar="CFG", help="config of the baseline")
    attention.set_defaults(func=_handle_attention)

    extremity = sub.add_parser(
        "extremity",
        help="per-head fraction of attention on each box edge (left/right/top/bottom), core and outside",
        description=(
            "For each head, the mean fraction of the attention of the top-scoring queries that falls in "
            "a band at each edge of the query's predicted box (band width = --band x box width/height), "
            "in the box core and outside, over the first --images val images. Writes one row per "
            "(layer, head) as CSV."
        ),
    )
    _model_args(extremity)
    extremity.add_argument("--images", type=int, default=8, help="first N val images (default 8)")
    extremity.add_argument(
        "--image", action="append", default=None, metavar="PATH_OR_ID",
        help="specific images instead of --images (repeatable)",
    )  # fmt: skip
    extremity.add_argument("--queries", type=int, default=5, help="top-scoring queries per image (default 5)")
    extremity.add_argument("--band", type=float, default=0.25, help="band width as a fraction of the box size")
    extremity.add_argument(
        "--kind", choices=("spatial", "full"), default="spatial",
        help="spatial-only maps (Conditional DETR; DETR falls back to full) or full cross-attention",
    )  # fmt: skip
    extremity.add_argument("--out", required=True, metavar="CSV", help="per-head summary table")
    extremity.add_argument("--per-query", default=None, metavar="CSV", help="also write the per-query rows")
    extremity.set_defaults(func=_handle_extremity)


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _handle_attention(args: argparse.Namespace) -> int:
    _check_positive("--queries", args.queries)
    from replic.viz.loading import load_images, load_model_for_viz
    from replic.viz.render import render_attention_figures

    vm = load_model_for_viz(args.checkpoint, args.config, args.scale, args.device)
    baseline = None
    if args.baseline_checkpoint:
        baseline = load_model_for_viz(args.baseline_checkpoint, args.baseline_config, args.scale, args.device)
    batch = load_images(args.image, vm.data_config)
    written = render_attention_figures(vm, batch, args.out, args.layer, args.queries, baseline)
    for path in written:
        print(path)
    return 0


def _handle_extremity(args: argparse.Namespace) -> int:
    _check_positive("--queries", args.queries)
    if not 0 < args.band <= 1:
        raise ValueError(f"--band must be in (0, 1], got {args.band}")
    from replic.data.io import atomic_write_bytes
    from replic.viz.loading import load_model_for_viz
    from replic.viz.render import measure_extremity, val_sources

    vm = load_model_for_viz(args.checkpoint, args.config, args.scale, args.device)
    sources = args.image or val_sources(vm, args.images)
    per_query, summary = measure_extremity(vm, sources, args.layer, args.queries, args.band, args.kind)
    atomic_write_bytes(args.out, summary.to_csv(index=False, float_format="%.4f").encode())
    if args.per_query:
        atomic_write_bytes(args.per_query, per_query.to_csv(index=False, float_format="%.4f").encode())
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0
