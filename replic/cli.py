"""The ``replic`` command line.

Each command group lives next to the code it drives and exposes
``register(subparsers)``; this file only wires them together, so adding a
command never means editing another group's module. Heavy imports (torch,
pycocotools) happen inside the handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# (module, description) for every command group, in the order --help lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "replic.data.cli",
    "replic.eval.cli",
    "replic.engine.cli",
    "replic.engine.compare",
    "replic.engine.pretrain",
    "replic.engine.backbone_asset",
    "replic.models.convert_cli",
    "replic.viz.cli",
    "replic.workflow.tables_cli",
    "replic.workflow.recipe",
)


def package_version() -> str:
    """replic's version: the installed distribution's metadata, else ``replic.__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("replic")
    except PackageNotFoundError:
        # A source checkout on sys.path that was never pip-installed has no metadata.
        import replic

        return str(getattr(replic, "__version__", "unknown"))


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available command group."""
    parser = argparse.ArgumentParser(
        prog="replic",
        description="Reproducible replication of DETR-family detection papers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"replic {package_version()}",
                        help="print the replic version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            # A command group that is not written yet must not break the others.
            if err.name == name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``replic`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from replic.io import DiskFullError

    try:
        return int(args.func(args) or 0)
    except DiskFullError as err:
        # Not bad input, but as clear: the file and "no space"; the previous version is intact.
        if args.verbose:
            raise
        from replic.engine.exit_codes import EXIT_DISK_FULL

        print(f"replic {args.command}: error: {err.strerror}", file=sys.stderr)
        return EXIT_DISK_FULL
    except (ValueError, FileNotFoundError, KeyError) as err:
        # Input errors are reported as one clear line, not a traceback.
        if args.verbose:
            raise
        print(f"replic {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
