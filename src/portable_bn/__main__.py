"""Command line.

``python -m portable_bn check [--backend NAME ...]``: every installed backend
against the float64 reference of PyTorch's rules.

``python -m portable_bn accuracy``: errors on hard data, ours beside PyTorch's.

``python -m portable_bn bench [--quick] [--backend NAME ...] [--shape N,C,...]
[--dtype NAME ...] [--repeats N] [--json PATH] [--plot PATH]``: speed and
memory as ratios to baselines measured in the same process.
"""

from __future__ import annotations

import argparse
import sys

from . import _bench
from .testing import _matrix as _backends


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m portable_bn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    bench = commands.add_parser(
        "bench",
        help="time every installed backend against its baselines (ratios measured in this process)",
        description="Speed and memory of batch_norm and batch_norm_backward as ratios to baselines timed in the "
        "same process, interleaved, medians of repeats (docs: performance).",
    )
    bench.add_argument(
        "--backend",
        action="append",
        choices=_bench.BACKENDS,
        help="limit to this backend (repeatable); default: all, skipping those not installed or without a GPU",
    )
    bench.add_argument(
        "--shape",
        action="append",
        type=_bench.parse_shape,
        metavar="N,C,...",
        help="input shape, channel axis 1, e.g. 32,64,56,56 (repeatable); default: "
        + " ".join(_bench.shape_text(s) for s in _bench.DEFAULT_SHAPES),
    )
    bench.add_argument("--dtype", action="append", choices=_bench.DTYPES, help="repeatable; default: all")
    bench.add_argument(
        "--quick",
        action="store_true",
        help="only (2,4,3,3) and (32,64,56,56), float32, 3 repeats, short samples (tests, CI)",
    )
    bench.add_argument(
        "--repeats",
        type=_positive_int,
        metavar="N",
        help="samples per timing (the median is kept); default: 21 below 2**20 elements, 7 above",
    )
    bench.add_argument("--json", metavar="PATH", help="also write the rows, targets and machine description as JSON")
    bench.add_argument("--plot", metavar="PATH", help="also draw the ratios into a PNG (needs matplotlib)")
    commands.add_parser(
        "accuracy",
        help="errors on hard data (large offsets, huge magnitudes, constant channels) beside PyTorch's",
        description="Normwise error of the training output against the float64 truth, per backend and dtype, "
        "and of torch.nn.functional.batch_norm on the same data where torch is installed.",
    )
    args = parser.parse_args(argv)
    if args.command == "accuracy":
        from ._accuracy import accuracy

        return accuracy()
    if args.command == "bench":
        return _bench.bench(
            backends=args.backend,
            shapes=args.shape,
            dtypes=args.dtype,
            quick=args.quick,
            repeats=args.repeats,
            json_path=args.json,
            plot_path=args.plot,
        )
    from ._check import check as run_check

    return run_check(args.backend)


if __name__ == "__main__":
    sys.exit(main())
