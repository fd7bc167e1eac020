"""``replic convert``: official checkpoints → replic checkpoints."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``convert`` command."""
    parser = subparsers.add_parser(
        "convert",
        help="convert an official DETR / Conditional DETR checkpoint to a replic checkpoint",
        description=(
            "Read an official .pth safely (weights_only, argparse.Namespace is the only allowed "
            "pickled class), take the architecture from its saved args, check every key and shape "
            "against the replic model, and write {model, model_config, source} with the input's "
            "sha256. An output ending in .safetensors is written as safetensors."
        ),
    )
    parser.add_argument("--from", dest="source_format", choices=("official",), required=True,
                        help="checkpoint layout of the input (official = the authors' .pth)")
    parser.add_argument("checkpoint", metavar="CKPT.pth", help="input checkpoint")
    parser.add_argument("--out", required=True, metavar="OUT", help="output .pt or .safetensors")
    parser.set_defaults(func=_handle_convert)


def _handle_convert(args: argparse.Namespace) -> int:
    from replic.models.convert import convert_official

    source = convert_official(args.checkpoint, args.out)
    log.info("wrote %s", args.out)
    print(json.dumps({"out": str(args.out), "sha256": source["sha256"], "epoch": source["epoch"]}, indent=2))
    return 0
