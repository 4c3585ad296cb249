"""The command line: ``python -m erasure_core {demo,erase} ...`` (``--help`` on each)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import ErasureError
from . import demo, erase

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m erasure_core",
        description="Concept erasure without ComfyUI. 'erase' edits a real checkpoint file and writes a LoRA; "
                    "'demo' shows the method on a random model. Run '<command> --help' for every flag.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,erase}")
    demo.add_parser(sub)
    erase.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ErasureError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
