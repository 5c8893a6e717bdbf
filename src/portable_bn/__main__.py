"""Command line: ``python -m portable_bn {check,accuracy,bench}``.

The texts shown by ``--help`` are plain words (argparse prints them as they are), kept in
the constants below; the work is done by :mod:`._check`, :mod:`._accuracy`, :mod:`._bench`
and :mod:`._bench_sync`.
"""

from __future__ import annotations

import argparse
import sys

from . import _bench, _bench_sync
from .testing import _matrix as _backends

DESCRIPTION = """\
portable_bn: PyTorch-exact batch normalization written once against the Python
array API standard, for NumPy, PyTorch, JAX, CuPy, Dask and array-api-strict.

commands:
  check     Compare every installed backend with a float64 reference that
            follows PyTorch's rules, and fail if any result is out of
            tolerance.
  accuracy  Print the error of the training output on data that breaks naive
            implementations, ours beside PyTorch's.
  bench     Time batch_norm and batch_norm_backward against baselines run in
            the same process, and print the ratios."""

EPILOG = """\
examples:
  python -m portable_bn check
  python -m portable_bn check --backend numpy --backend torch
  python -m portable_bn bench --quick --backend numpy

Run python -m portable_bn COMMAND --help for the options of a command."""

CHECK_DESCRIPTION = """\
Compare portable_bn with a float64 reference implementation of PyTorch's
batch-norm rules, on every installed backend, device and dtype (float16,
bfloat16, float32, float64 where the library has them). It runs the
comparisons of the test suite: BatchNorm1d/2d/3d through a series of training
and eval calls (with momentum 0.1 and None, without affine parameters and
running statistics, channels last); batch_norm and batch_norm_backward in
training and eval on small and large inputs; and training calls on data that
breaks naive implementations (large offsets, huge magnitudes, constant
channels). Every output, running statistic and gradient is compared, each
against a tolerance that depends on its dtype.

Prints one row per backend, device and dtype: the comparison that came
closest to its tolerance, its error, the tolerance, and PASS or FAIL (with
the comparisons that failed). Backends that are not installed, and GPU
backends without a GPU, are listed as skipped. The last line is "all passed"
or "FAILED".

Exit status: 0 if every comparison passed (skipped backends do not count),
1 if any failed or raised an exception."""

CHECK_EPILOG = """\
examples:
  python -m portable_bn check
  python -m portable_bn check --backend numpy --backend jax"""

ACCURACY_DESCRIPTION = """\
Measure how accurate the training-mode output of batch_norm is on data that
breaks naive implementations: large offsets, tiny variances, magnitudes whose
squares overflow float32, values near the largest float32, constant channels.
For every installed backend and dtype, and for PyTorch's own
torch.nn.functional.batch_norm where torch is installed (on the CPU, and on
CUDA with and without cuDNN where torch sees a GPU), the output is compared
with the exact result computed in float64.

Prints two tables. The first has one row per implementation and dtype and
one column per data set, each cell the normwise error
max|y - y64| / max(1, max|y64|), where y64 is the float64 result ("-" where
the dtype cannot hold the data). The second gives the error of the float32
training backward (input, weight and bias gradients) against the float64
gradients of the same data, ours per backend beside PyTorch's autograd.

Exit status: always 0; this command reports, it does not judge."""

BENCH_DESCRIPTION = """\
Time batch_norm (training and eval forward) and batch_norm_backward on every
installed backend, against baselines run in the same process on the same
data: the textbook implementation in the same library (NumPy, CuPy, JAX under
jit), PyTorch's own F.batch_norm and autograd (PyTorch, and CuPy where torch
sees a GPU), and for NumPy and CuPy a plain copy of the input. Calls are
timed in turn and each time is the median of several samples.

Prints the machine and library versions, the backends that were not measured
and why, a table with a legend of its columns, and a short summary of the
ratios. Progress goes to standard error. Exit status: 0 when it ran, 1 if no
backend could be loaded, 2 for a bad option.

With --sync (not part of the default run: it starts processes and a local
cluster, and adds about a minute), then one more table: what synchronized
batch norm (sync=) costs per call on each engine, on a float32 (32,64,28,28)
batch split over the replicas. torch.distributed: 2 processes started by the
bench, joined by gloo over 127.0.0.1, with sync=TorchProcessGroup(); JAX:
shard_map over 4 CPU devices forced in a child process, under jit, with
sync=JaxAxis; Dask: a LocalCluster of 2 worker processes on 127.0.0.1 (Dask
needs no reducer: a chunked array is the global batch). Each row gives the
collectives of one call with sync, its time, the time of the same call
without sync (each replica with its own statistics; for Dask, the same graph
on the threaded scheduler), their difference and ratio (sampled in turn in
the same run), and the time of the collectives alone. It also says what
torch.nn.SyncBatchNorm does on the CPU. Each engine runs in child processes
that are killed after a time limit; engines not installed, or whose processes
failed, are listed as not measured."""

BENCH_EPILOG = """\
examples:
  python -m portable_bn bench --quick
  python -m portable_bn bench --backend numpy --shape 32,64,56,56 --dtype float32
  python -m portable_bn bench --json bench.json --plot bench.png
  python -m portable_bn bench --sync-only --json sync.json"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    plain = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m portable_bn",
        usage="%(prog)s [-h] COMMAND [OPTIONS]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=plain,
    )
    # The commands are listed in DESCRIPTION, one sentence each, rather than by argparse.
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS, prog=parser.prog
    )
    check = commands.add_parser(
        "check",
        description=CHECK_DESCRIPTION,
        epilog=CHECK_EPILOG,
        formatter_class=plain,
    )
    check.add_argument(
        "--backend",
        action="append",
        choices=_backends.ALL_BACKENDS,
        metavar="NAME",
        help="check only this backend (repeatable): " + ", ".join(_backends.ALL_BACKENDS) + "; default: all, "
        "skipping those not installed",
    )
    commands.add_parser(
        "accuracy",
        description=ACCURACY_DESCRIPTION,
        formatter_class=plain,
    )
    bench = commands.add_parser(
        "bench",
        description=BENCH_DESCRIPTION,
        epilog=BENCH_EPILOG,
        formatter_class=plain,
    )
    bench.add_argument(
        "--backend",
        action="append",
        choices=_bench.BACKENDS,
        metavar="NAME",
        help="time only this backend (repeatable): " + ", ".join(_bench.BACKENDS) + "; default: all, skipping "
        "those not installed or without a GPU",
    )
    bench.add_argument(
        "--shape",
        action="append",
        type=_bench.parse_shape,
        metavar="N,C,...",
        help="input shape, channel axis 1, e.g. 32,64,56,56 (repeatable); default: "
        + " ".join(_bench.shape_text(s) for s in _bench.DEFAULT_SHAPES),
    )
    bench.add_argument(
        "--dtype",
        action="append",
        choices=_bench.DTYPES,
        metavar="NAME",
        help="input dtype (repeatable): " + ", ".join(_bench.DTYPES) + "; default: all",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="only (2,4,3,3) and (32,64,56,56), float32, 3 repeats, short samples (seconds, for tests and CI); "
        "with --sync: a (8,4,4,4) batch",
    )
    bench.add_argument(
        "--repeats",
        type=_positive_int,
        metavar="N",
        help="samples per timing (the median is kept); default: 21 below 2**20 elements, 7 above; --sync: 21",
    )
    bench.add_argument(
        "--sync",
        action="store_true",
        help="then also time synchronized batch norm (sync=) on torch.distributed, JAX and Dask, against "
        "the same calls without sync: one more table (about a minute; not part of the default run)",
    )
    bench.add_argument(
        "--sync-only",
        action="store_true",
        help="only the synchronized batch norm table (implies --sync; --backend, --shape and --dtype are ignored)",
    )
    bench.add_argument(
        "--sync-engine",
        action="append",
        choices=_bench_sync.SYNC_ENGINES,
        metavar="NAME",
        help="time synchronized batch norm only on this engine (repeatable; implies --sync): "
        + ", ".join(_bench_sync.SYNC_ENGINES)
        + "; default: all, skipping those not installed",
    )
    bench.add_argument(
        "--json", metavar="PATH", help="also write the rows (and those of --sync) and the machine description as JSON"
    )
    bench.add_argument("--plot", metavar="PATH", help="also draw the ratios into a PNG (needs matplotlib)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    if not (sys.argv[1:] if argv is None else argv):  # no command: the help, not a usage error
        parser.print_help()
        return 2
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
            sync=args.sync,
            sync_only=args.sync_only,
            sync_engines=args.sync_engine,
        )
    from ._check import check as run_check

    return run_check(args.backend)


if __name__ == "__main__":
    sys.exit(main())
