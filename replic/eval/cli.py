"""``replic score``: COCO bbox metrics for a detections file."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``score`` command."""
    parser = subparsers.add_parser(
        "score",
        help="score COCO-format detections against COCO ground truth",
        description=(
            "Compute AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl "
            "(fractions in [0, 1]; null where the ground truth has no object in a bucket)."
        ),
    )
    parser.add_argument("--gt", required=True, metavar="ANN.json", help="COCO annotation file")
    parser.add_argument(
        "--dets", required=True, metavar="DETS.json",
        help="COCO results list of {image_id, category_id, bbox [x,y,w,h], score}",
    )  # fmt: skip
    parser.add_argument(
        "--backend", choices=("pycocotools", "faster-coco-eval"), default="pycocotools",
        help="pycocotools is the reference; faster-coco-eval gives the same numbers faster",
    )  # fmt: skip
    parser.add_argument("--out", metavar="METRICS.json", help="also write the metrics here (atomically)")
    parser.add_argument(
        "--breakdown", action="store_true",
        help="also AP50 / recall at IoU 0.5 by area, per category and class-agnostic, and a "
             "confusion matrix of medium and large objects (where AP is lost: boxes or classes)",
    )  # fmt: skip
    parser.set_defaults(func=_handle_score)


def _handle_score(args: argparse.Namespace) -> int:
    from replic.eval.coco_eval import metrics_to_json, score_with_log, write_json_atomic

    metrics, summary = score_with_log(args.gt, args.dets, backend=args.backend)
    log.debug("%s summary:\n%s", args.backend, summary)
    payload: dict[str, Any] = dict(metrics_to_json(metrics))
    if args.breakdown:
        from replic.eval.breakdown import breakdown, format_breakdown

        payload["breakdown"] = breakdown(args.gt, args.dets)
        log.info("breakdown:\n%s", format_breakdown(payload["breakdown"]))
    if args.out:
        write_json_atomic(args.out, payload)
        log.info("wrote %s", args.out)
    print(json.dumps(payload, indent=2))
    return 0
