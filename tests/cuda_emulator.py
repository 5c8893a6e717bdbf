"""Run the CuPy fast path's CUDA kernels on the CPU, against the float64 reference.

``python tests/cuda_emulator.py`` installs a stand-in ``cupy`` module (only
what :mod:`portable_bn._cupy_fast` uses), compiles the kernels' CUDA source
with g++ (C++20) and runs each launch block by block, with one ``std::thread``
per CUDA thread and a ``std::barrier`` for ``__syncthreads``. Every kernel
argument is checked against the kernel's C parameter list (pointer or scalar,
and the scalar's exact type), so the Python glue is tested as well as the
kernels' arithmetic. Exit status 0 when every case matches.

This is not a GPU: no warps, no memory model, float math from the host's
libm. It catches logic, indexing and argument mistakes where no GPU exists
(``tests/test_cupy_fast.py`` is the real test, on a GPU). Run by
``tests/test_cuda_emulator.py`` in the numpy session; needs g++ with C++20.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np

_PRELUDE = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
using std::fmax; using std::fmin; using std::ilogb; using std::isfinite;
using std::ldexp; using std::min; using std::sqrt;
#define __global__
#define __device__
#define __shared__ static
#define __restrict__
struct Dim3 { unsigned int x = 0, y = 0, z = 0; };
static Dim3 blockIdx, blockDim, gridDim;
static thread_local Dim3 threadIdx;
static std::barrier<>* emu_barrier = nullptr;
static void __syncthreads() { emu_barrier->arrive_and_wait(); }
static double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
static void emu_launch(unsigned grid, unsigned block, const std::function<void()>& body) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        std::barrier<> barrier(block);
        emu_barrier = &barrier;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; ++t) threads.emplace_back([&, t] { threadIdx.x = t; body(); });
        for (auto& thread : threads) thread.join();
    }
}
"""

_SCALARS: dict[str, tuple[Any, Any]] = {  # C type: (NumPy scalar type, ctypes type)
    "float": (np.float32, ctypes.c_float),
    "double": (np.float64, ctypes.c_double),
    "int": (np.int32, ctypes.c_int),
    "unsigned int": (np.uint32, ctypes.c_uint32),
    "long long": (np.int64, ctypes.c_int64),
}
_BUILD = Path(tempfile.gettempdir()) / "pbn_cuda_emulator"


class _Kernel:
    def __init__(self, function: Any, params: list[tuple[str, bool]]) -> None:
        self.function, self.params = function, params
        function.argtypes = [ctypes.c_uint, ctypes.c_uint] + [
            ctypes.c_void_p if pointer else _SCALARS[ctype][1] for ctype, pointer in params
        ]

    def __call__(self, grid: tuple[int], block: tuple[int], args: tuple[Any, ...]) -> None:
        assert len(args) == len(self.params), f"{len(args)} arguments for {len(self.params)} parameters"
        values = []
        for position, (arg, (ctype, pointer)) in enumerate(zip(args, self.params, strict=True)):
            if pointer:
                assert isinstance(arg, np.ndarray), f"argument {position}: an array expected, got {type(arg)}"
                assert arg.dtype == _SCALARS[ctype][0], f"argument {position}: {ctype}* expected, got {arg.dtype}"
                assert arg.flags.c_contiguous, f"argument {position}: not contiguous"
                values.append(arg.ctypes.data)
            else:
                assert type(arg) is _SCALARS[ctype][0], f"argument {position}: {ctype} expected, got {type(arg)}"
                values.append(arg.item())
        self.function(grid[0], block[0], *values)


class RawModule:
    """``cupy.RawModule`` for templated kernels named by ``name_expressions``."""

    def __init__(self, code: str, options: tuple[str, ...] = (), name_expressions: tuple[str, ...] = ()) -> None:
        wrappers, self.kernels = [], {}
        for number, expression in enumerate(name_expressions):
            name, arguments = re.fullmatch(r"(\w+)<(.*)>", expression).groups()
            template = dict(zip(("T", "I"), (a.strip() for a in arguments.split(",")), strict=True))
            signature = re.search(r"void " + name + r"\((.*?)\)\s*\{", code, re.S).group(1)
            params = []
            for param in signature.split(","):
                pointer = "*" in param
                words = param.replace("const", " ").replace("__restrict__", " ").replace("*", " ").split()[:-1]
                ctype = " ".join(words)
                params.append((template.get(ctype, ctype), pointer))
            declared = ", ".join(("void*" if p else c) + f" a{k}" for k, (c, p) in enumerate(params))
            passed = ", ".join(f"({c}*)a{k}" if p else f"a{k}" for k, (c, p) in enumerate(params))
            wrappers.append(
                f'extern "C" void emu{number}(unsigned grid, unsigned block, {declared}) '
                f"{{ emu_launch(grid, block, [&] {{ {name}<{arguments}>({passed}); }}); }}"
            )
            self.kernels[expression] = (f"emu{number}", params)
        source = _PRELUDE + code + "\n" + "\n".join(wrappers) + "\n"
        _BUILD.mkdir(exist_ok=True)
        library = _BUILD / f"kernels_{hashlib.sha256(source.encode()).hexdigest()[:16]}.so"
        if not library.exists():
            cpp = library.with_suffix(".cpp")
            cpp.write_text(source)
            fp = ["-ffp-contract=off"] if "--fmad=false" in options else []
            subprocess.run(
                ["g++", "-std=c++20", "-O1", *fp, "-shared", "-fPIC", "-pthread", str(cpp), "-o", str(library)],
                check=True,
            )
        self.library = ctypes.CDLL(str(library))

    def get_function(self, expression: str) -> _Kernel:
        symbol, params = self.kernels[expression]
        return _Kernel(getattr(self.library, symbol), params)


class _Array(np.ndarray):
    """A NumPy array that answers ``.device.id`` as a CuPy array does."""

    device = types.SimpleNamespace(id=0)


def _array(value: Any) -> _Array:
    return np.asarray(value).view(_Array)


def install(multiprocessors: int) -> None:
    """Make ``import cupy`` give the stand-in (before portable_bn._cupy_fast is imported)."""
    fake = types.ModuleType("cupy")
    fake.ndarray = _Array
    fake.float32, fake.float64 = np.float32, np.float64
    fake.ascontiguousarray = lambda x: _array(np.ascontiguousarray(x))
    fake.empty = lambda shape, dtype=np.float64: _array(np.empty(shape, dtype))
    fake.empty_like = lambda x: _array(np.empty_like(np.asarray(x)))
    fake.RawModule = RawModule
    attributes = {"MultiProcessorCount": multiprocessors}
    fake.cuda = types.SimpleNamespace(Device=lambda _: types.SimpleNamespace(attributes=attributes))
    sys.modules["cupy"] = fake


def main() -> int:
    """The cases; returns the number of failures."""
    install(multiprocessors=3)  # 12 reduction blocks in all: several per channel
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from portable_bn import _cupy_fast, _functional, batch_norm
    from portable_bn._recipe import make_recipe
    from portable_bn._reference import reference_backward, reference_batch_norm
    from portable_bn._tolerance import max_error, tolerance

    failures = []

    def expect(label: str, got: Any, want: np.ndarray, dtype: str) -> None:
        got = np.asarray(got, dtype=np.float64)
        nan = np.isnan(want)
        with np.errstate(invalid="ignore"):
            beyond = ~nan & (np.abs(want) > np.finfo(dtype).max)  # Inf in the dtype
        if not np.isnan(got[nan]).all():
            failures.append(f"{label}: NaN expected")
        if not (got[beyond] == np.sign(want[beyond]) * np.inf).all():
            failures.append(f"{label}: Inf expected")
        rest = ~nan & ~beyond
        error = max_error(got[rest], want[rest]) if rest.any() else 0.0
        if not error <= tolerance(dtype):
            failures.append(f"{label}: error {error:.2e}")

    def forward(
        x_host: np.ndarray,
        dtype: str,
        *,
        axis: int = 1,
        training: bool = True,
        affine: bool = True,
        running: bool = True,
        factor: Any = 0.1,
        skip: bool = False,
        truth: str = "reference",
        strided_vectors: bool = False,
    ) -> None:
        channels = x_host.shape[axis]
        rng = np.random.default_rng(1)
        host = {
            "running_mean": rng.uniform(-1, 1, channels) if running else None,
            "running_var": rng.uniform(0.5, 2, channels) if running else None,
            "weight": rng.uniform(0.5, 2, channels) if affine else None,
            "bias": rng.normal(size=channels) if affine else None,
        }
        x = _array(x_host.astype(dtype))
        vectors = {k: None if v is None else _array(v.astype(dtype)) for k, v in host.items()}
        if strided_vectors:  # every other element of a longer vector: the kernels need dense copies
            vectors = {k: None if v is None else _array(np.repeat(v, 2))[::2] for k, v in vectors.items()}
        recipe = make_recipe(tuple(x.shape), axis)
        momentum = 0.5 if not isinstance(factor, float) else factor
        arg = _array(np.asarray(momentum, dtype=dtype)) if not isinstance(factor, float) else factor
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if training:
                got = _cupy_fast.train_forward(x, *vectors.values(), recipe, factor=arg, eps=1e-5, skip_nonfinite=skip)
            else:
                got = _cupy_fast.eval_forward(x, *vectors.values(), recipe, eps=1e-5)
            numpy_args = [np.asarray(x).copy()] + [
                None if v is None else np.asarray(v).copy() for v in vectors.values()
            ]
            if truth == "reference":
                want = reference_batch_norm(
                    numpy_args[0].astype(np.float64),
                    *(None if v is None else v.astype(np.float64) for v in numpy_args[1:]),
                    training=training,
                    momentum=momentum,
                    axis=axis,
                )
            else:  # the agnostic code (data beyond the reference's float64 sums, skip_nonfinite)
                _functional.FAST_PATHS = False
                result = batch_norm(*numpy_args, training=training, momentum=momentum, axis=axis, skip_nonfinite=skip)
                _functional.FAST_PATHS = True
                want = result._asdict()
        label = f"{dtype} {x_host.shape} axis={axis} training={training} affine={affine} running={running} skip={skip}"
        assert got[0].dtype == x.dtype and got[0].shape == x.shape, label
        for name, value in zip(("output", "running_mean", "running_var", "mean", "invstd"), got, strict=True):
            if want[name] is None or value is None:
                if (want[name] is None) != (value is None):
                    failures.append(f"{label} {name}: None mismatch")
                continue
            expect(f"{label} {name}", value, np.asarray(want[name], dtype=np.float64), dtype)

    def backward(x_host: np.ndarray, dtype: str, *, axis: int = 1, training: bool = True, affine: bool = True) -> None:
        rng = np.random.default_rng(7)
        x, grad = _array(x_host.astype(dtype)), _array(rng.normal(size=x_host.shape).astype(dtype))
        weight = _array(rng.uniform(0.5, 2, x_host.shape[axis]).astype(dtype)) if affine else None
        stats = batch_norm(np.asarray(x).copy(), training=True, axis=axis)
        mean, invstd = _array(stats.mean), _array(stats.invstd)
        got = _cupy_fast.backward(grad, x, weight, mean, invstd, make_recipe(tuple(x.shape), axis), training=training)
        host = [None if a is None else np.asarray(a, dtype=np.float64) for a in (grad, x, weight, mean, invstd)]
        want = reference_backward(*host, training=training, axis=axis)
        label = f"backward {dtype} {x_host.shape} axis={axis} training={training} affine={affine}"
        for name, value, expected in zip(("grad_input", "grad_weight", "grad_bias"), got, want, strict=True):
            assert value.dtype == x.dtype, label
            expect(f"{label} {name}", value, expected, dtype)

    def cases(rng: np.random.Generator, *, backward_too: bool) -> None:
        for dtype in ("float32", "float64"):
            for shape, axis in (((4, 3, 7), 1), ((5, 6, 3, 4), -1), ((8, 3, 40, 40), 1), ((600, 2), 1)):
                x_host = 3.0 + 2.0 * rng.normal(size=shape)
                forward(x_host, dtype, axis=axis)
                forward(x_host, dtype, axis=axis, affine=False, factor=None)  # a module's 0-d factor
                forward(x_host, dtype, axis=axis, running=False)
                forward(x_host, dtype, axis=axis, training=False)
                if backward_too:  # the backward has no fused variant
                    backward(x_host, dtype, axis=axis)
                    backward(x_host, dtype, axis=axis, training=False, affine=False)
            forward(rng.normal(size=(8, 3, 10, 6))[:, :, ::2, 1:], dtype)  # strided
            forward(rng.normal(size=(8, 3, 10)), dtype, strided_vectors=True)
            forward(rng.normal(size=(8, 3, 10)), dtype, training=False, strided_vectors=True)
            special = rng.normal(size=(6, 5, 7))
            special[:, 1], special[:, 2] = 123.4375, 3e38  # constant channels: output exactly bias
            special[2, 3, 4], special[1, 4, 0] = np.nan, np.inf
            forward(special, dtype)
            special[:, 2] = 1.0
            forward(special, dtype, skip=True, truth="agnostic")  # NaN/Inf channels keep their running values
        for offset, spread in ((1e4, 0.1), (1e20, 1e19), (-3e38, 1e37)):
            forward(np.clip(offset + spread * rng.normal(size=(8, 3, 4, 4)), -3.4e38, 3.4e38), "float32")
        for offset, spread in ((1e12, 1.0), (1e300, 1e299), (0.0, 1e-300)):
            forward(offset + spread * rng.normal(size=(8, 3, 4, 4)), "float64", truth="agnostic")

    # The one-launch output kernels (C <= _FUSED_UP_TO, training also on large grids), then the
    # separate vector kernels.
    defaults = _cupy_fast._FUSED_UP_TO, _cupy_fast._FUSED_TRAIN_GRID
    _cupy_fast._FUSED_TRAIN_GRID = 16
    for fused_up_to in (defaults[0], 0):
        _cupy_fast._FUSED_UP_TO = fused_up_to
        cases(np.random.default_rng(2), backward_too=fused_up_to > 0)
    _cupy_fast._FUSED_UP_TO, _cupy_fast._FUSED_TRAIN_GRID = defaults
    launched: list[str] = []
    compiled = _cupy_fast._kernels

    def recording(*args: Any) -> dict[str, Any]:
        def launcher(name: str, kernel: Any) -> Any:
            def launch(*launch_args: Any) -> None:
                launched.append(name)
                kernel(*launch_args)

            return launch

        return {name: launcher(name, kernel) for name, kernel in compiled(*args).items()}

    _cupy_fast._kernels = recording
    for shape, sequence in (
        ((2, 3, 5), ["stats1", "stats2", "train_apply"]),
        ((8, 3, 40, 40), ["stats1", "stats2", "train_vectors", "apply"]),
    ):
        launched.clear()
        forward(np.random.default_rng(4).normal(size=shape), "float32")
        if launched != sequence:  # by default training fuses only grids of one block per multiprocessor
            failures.append(f"{shape}: launched {launched}, expected {sequence}")
    _cupy_fast._kernels = compiled
    rng = np.random.default_rng(3)
    _cupy_fast._WIDE_FROM = 0  # the 64-bit index kernels
    _cupy_fast._plan.cache_clear()
    x_host = -1.0 + rng.normal(size=(8, 3, 40, 40))
    _cupy_fast._FUSED_TRAIN_GRID = 16
    for fused_up_to in (defaults[0], 0):
        _cupy_fast._FUSED_UP_TO = fused_up_to
        forward(x_host, "float32")
        forward(x_host, "float64", training=False)
    _cupy_fast._FUSED_UP_TO, _cupy_fast._FUSED_TRAIN_GRID = defaults
    backward(x_host, "float64")
    for failure in failures:
        print("FAIL", failure)
    print(f"{len(failures)} failures")
    return len(failures)


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
