"""Command line: ``python -m portable_bn check [--backend NAME ...]``."""

from __future__ import annotations

import argparse
import sys

from . import _backends


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m portable_bn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check", help="compare every installed backend and device with the float64 reference of PyTorch's rules"
    )
    check.add_argument(
        "--backend",
        action="append",
        choices=_backends.ALL_BACKENDS,
        help="limit to this backend (repeatable); default: all, skipping those not installed",
    )
    args = parser.parse_args(argv)
    from ._check import check as run_check

    return run_check(args.backend)


if __name__ == "__main__":
    sys.exit(main())
