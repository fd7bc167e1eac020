"""``replic train`` and ``replic eval``."""

from __future__ import annotations

import argparse
import sys

# Not a heavy import here: the replic.engine package already imports its config module.
from replic.engine.config import SCALE_NAMES
from replic.engine.exit_codes import EXIT_PREEMPTED

SCALE_HELP = ("scale overlay: one of " + ", ".join(SCALE_NAMES)
              + ", or a path to an overlay YAML file (default: paper as written)")


def _load(args: argparse.Namespace):  # noqa: ANN202 - ExperimentConfig, imported lazily
    from replic.engine.config import load_experiment, parse_overrides

    return load_experiment(args.config, args.scale, parse_overrides(args.set))


def _train(args: argparse.Namespace) -> int:
    cfg = _load(args)  # validated before any data is read
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    from replic.engine.config import parse_overrides
    from replic.engine.train import NonFiniteLossError, train
    from replic.engine.weight_rule import RuleSource

    source = RuleSource(args.config, args.scale, parse_overrides(args.set))
    try:
        return train(cfg, args.out, force=args.force, resume=args.resume,
                     progress=not args.no_progress, rule_source=source)
    except NonFiniteLossError as err:
        print(f"replic train: error: {err}", file=sys.stderr)
        return 3


def _eval(args: argparse.Namespace) -> int:
    cfg = _load(args)
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    from replic.engine.evaluate import evaluate_checkpoint

    evaluate_checkpoint(cfg, args.checkpoint, args.out, progress=not args.no_progress)
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML (configs/experiments/*.yaml)")
    parser.add_argument("--scale", default=None, help=SCALE_HELP)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key after the scale overlay, e.g. "
                        "--set data.root=/data/coco --set train.epochs=2 (value parsed as YAML)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``eval`` to the ``replic`` command."""
    p = subparsers.add_parser(
        "train", help="train an experiment into a run directory",
        description="Train an experiment. Re-running into the same --out continues from its last "
        f"checkpoint. SIGTERM/SIGUSR1 checkpoint at the next step and exit {EXIT_PREEMPTED}; "
        "a non-finite loss exits 3.",
    )
    _common(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="require and continue from RUN_DIR/checkpoints/last.pt")
    p.add_argument("--force", action="store_true",
                   help="start afresh even if RUN_DIR holds a run with a different config")
    p.set_defaults(func=_train)

    p = subparsers.add_parser(
        "eval", help="COCO-evaluate a checkpoint",
        description="Evaluate a replic or converted official checkpoint on the val split; writes "
        "OUT/detections.json and OUT/metrics.json.",
    )
    _common(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint (.pt) with a 'model' state dict")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_eval)
