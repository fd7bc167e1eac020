"""``replic data ...`` commands: synthetic data generation and COCO subsets."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command group to the top-level parser."""
    data = subparsers.add_parser("data", help="synthetic COCO data and COCO subsets")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    synth = sub.add_parser(
        "synth",
        help="write a deterministic synthetic detection dataset in the COCO 2017 layout",
        description=(
            "Write OUT/annotations/instances_{train,val}2017.json and OUT/{train,val}2017/*.jpg. "
            "The same arguments give byte-identical files. All three COCO area buckets occur "
            "from --size 160 up (large objects need > 96x96 px)."
        ),
    )
    synth.add_argument("--out", required=True, help="dataset root directory")
    synth.add_argument("--train", type=int, default=128, help="training images (default 128)")
    synth.add_argument("--val", type=int, default=32, help="validation images (default 32)")
    synth.add_argument("--size", type=int, default=320, help="longest image side in px (default 320)")
    synth.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    synth.set_defaults(func=_run_synth)

    subset = sub.add_parser(
        "subset",
        help="write a reproducible subset of a COCO annotation file",
        description=(
            "Sample --images images with --seed; keep their annotations and the categories. "
            "With --categories only images holding those categories are eligible and only "
            "those annotations/categories are kept."
        ),
    )
    subset.add_argument("--ann", required=True, help="source COCO instances JSON")
    subset.add_argument("--images", type=int, required=True, help="number of images to keep")
    subset.add_argument(
        "--categories", nargs="+", default=None, metavar="NAME_OR_ID", help="category names or ids"
    )
    subset.add_argument("--seed", type=int, required=True, help="sampling seed")
    subset.add_argument("--out", required=True, help="output JSON path")
    subset.set_defaults(func=_run_subset)


def _run_synth(args: argparse.Namespace) -> int:
    import time

    from replic.data.synth import generate_synthetic_coco

    start = time.perf_counter()
    paths = generate_synthetic_coco(args.out, args.train, args.val, args.size, args.seed)
    log.info(
        "wrote %d train + %d val images to %s in %.2f s",
        args.train,
        args.val,
        paths["root"],
        time.perf_counter() - start,
    )
    return 0


def _run_subset(args: argparse.Namespace) -> int:
    import json

    from replic.data.subset import write_subset

    out = write_subset(args.ann, args.images, args.seed, args.out, args.categories)
    with open(out, "rb") as handle:
        data = json.load(handle)
    log.info(
        "wrote %s: %d images, %d annotations, %d categories",
        out,
        len(data["images"]),
        len(data["annotations"]),
        len(data["categories"]),
    )
    return 0
