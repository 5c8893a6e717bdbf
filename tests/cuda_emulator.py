"""Run the CuPy backend's CUDA kernels on the CPU, against the pure primitives and the reference.

``python tests/cuda_emulator.py`` installs a stand-in ``cupy`` module (only what
:mod:`portable_bn._backends.cupy` uses), compiles the kernels with g++ (C++20) and runs them:
``RawModule`` kernels block by block, with one ``std::thread`` per CUDA thread and a
``std::barrier`` for ``__syncthreads``; ``ElementwiseKernel`` bodies (the fused forms, and the
per-channel arithmetic traced from :mod:`portable_bn._agnostic`) in a loop over the elements.
Every raw kernel argument is checked against the kernel's C parameter list (pointer or scalar,
and the scalar's exact type), so the Python glue is tested as well as the arithmetic. The
shared algorithm then runs on the CuPy primitive set (its arrays are NumPy arrays here) and is
compared with the float64 reference and the pure primitives. Exit status 0 when every case
matches.

This is not a GPU: no warps, no memory model, float math from the host's libm. It catches
logic, indexing, code-generation and argument mistakes where no GPU exists
(``tests/test_cupy.py`` is the real test, on a GPU). Run by ``tests/test_cuda_emulator.py``
in the numpy session; needs g++ with C++20.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
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
#include <cstddef>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
using std::fmax; using std::fmin; using std::isfinite; using std::min; using std::sqrt;
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
static float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
static long long __double_as_longlong(double d) { long long v; std::memcpy(&v, &d, 8); return v; }
static int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
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
    "bool": (np.bool_, ctypes.c_bool),
}
_CUPY_TYPES = {"float32": "float", "float64": "double", "bool": "bool", "int64": "long long", "int32": "int"}
_BUILD = Path(tempfile.gettempdir()) / "pbn_cuda_emulator"


def _compile(source: str, options: tuple[str, ...]) -> ctypes.CDLL:
    _BUILD.mkdir(exist_ok=True)
    library = _BUILD / f"kernels_{hashlib.sha256(source.encode()).hexdigest()[:16]}.so"
    if not library.exists():
        cpp = library.with_suffix(".cpp")
        cpp.write_text(source)
        fp = ["-ffp-contract=off"] if "--fmad=false" in options else []
        command = ["g++", "-std=c++20", "-O1", *fp, "-shared", "-fPIC", "-pthread", str(cpp), "-o", str(library)]
        subprocess.run(command, check=True)
    return ctypes.CDLL(str(library))


class _Kernel:
    def __init__(self, function: Any, params: list[tuple[str, bool]], name: str) -> None:
        self.function, self.params, self.name = function, params, name
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
        launched.append(self.name)
        self.function(grid[0], block[0], *values)


class RawModule:
    """``cupy.RawModule`` for templated kernels named by ``name_expressions``."""

    def __init__(self, code: str, options: tuple[str, ...] = (), name_expressions: tuple[str, ...] = ()) -> None:
        wrappers, self.kernels = [], {}
        for number, expression in enumerate(name_expressions):
            name, arguments = re.fullmatch(r"(\w+)<(.*)>", expression).groups()
            declared = re.search(r"template <([^>]*)>\s*__global__ void " + name + r"\(", code).group(1)
            names = [part.split()[-1] for part in declared.split(",")]
            template = dict(zip(names, (a.strip() for a in arguments.split(",")), strict=True))
            signature = re.search(r"void " + name + r"\((.*?)\)\s*\{", code, re.S).group(1)
            params = []
            for param in signature.split(","):
                pointer = "*" in param
                words = param.replace("const", " ").replace("__restrict__", " ").replace("*", " ").split()[:-1]
                ctype = " ".join(words)
                params.append((template.get(ctype, ctype), pointer))
            typed = ", ".join(("void*" if p else c) + f" a{k}" for k, (c, p) in enumerate(params))
            passed = ", ".join(f"({c}*)a{k}" if p else f"a{k}" for k, (c, p) in enumerate(params))
            wrappers.append(
                f'extern "C" void emu{number}(unsigned grid, unsigned block, {typed}) '
                f"{{ emu_launch(grid, block, [&] {{ {name}<{arguments}>({passed}); }}); }}"
            )
            self.kernels[expression] = (f"emu{number}", params)
        self.library = _compile(_PRELUDE + code + "\n" + "\n".join(wrappers) + "\n", options)

    def get_function(self, expression: str) -> _Kernel:
        symbol, params = self.kernels[expression]
        return _Kernel(getattr(self.library, symbol), params, expression.split("<")[0])


launched: list[str] = []
"""Names of the kernels launched, in order (raw kernels and elementwise ones)."""


class ElementwiseKernel:
    """``cupy.ElementwiseKernel``: ``operation`` once per element ``i`` of the broadcast shape of
    the non-raw array arguments; ``raw`` parameters are indexed by the operation itself."""

    def __init__(
        self, in_params: str, out_params: str, operation: str, name: str = "kernel", *, options: Any = (), **kwargs: Any
    ) -> None:
        self.inputs = [self._param(p) for p in in_params.split(",")]
        self.outputs = [self._param(p) for p in out_params.split(",")]
        self.operation, self.name, self.options = operation, name, tuple(options)
        self.return_tuple = kwargs.get("return_tuple", False)
        self.compiled: dict[str, Any] = {}

    @staticmethod
    def _param(text: str) -> tuple[str, str, bool]:
        words = text.split()
        raw = words[0] == "raw"
        return words[-2], words[-1], raw  # type, name, raw

    def __call__(self, *args: Any) -> Any:
        assert len(args) == len(self.inputs), f"{self.name}: {len(args)} arguments for {len(self.inputs)}"
        is_array = tuple(isinstance(a, np.ndarray) for a in args)
        broadcast = [
            a.shape for a, (_, _, raw), array in zip(args, self.inputs, is_array, strict=True) if array and not raw
        ]
        shape = np.broadcast_shapes(*broadcast)
        t = next((a.dtype.name for a, (kind, _, _) in zip(args, self.inputs, strict=True) if kind == "T"), "float64")
        ctype = {"T": _CUPY_TYPES[t], **_CUPY_TYPES}
        key = (t, is_array)
        if key not in self.compiled:
            self.compiled[key] = self._build(ctype, is_array)
        values: list[Any] = [ctypes.c_longlong(math.prod(shape))]
        keep = []
        for arg, (kind, name, raw), array in zip(args, self.inputs, is_array, strict=True):
            c = ctype[kind]
            if array:
                assert arg.dtype == _SCALARS[c][0], f"{self.name} {name}: {c} expected, got {arg.dtype}"
                data = np.ascontiguousarray(arg if raw else np.broadcast_to(arg, shape))
                keep.append(data)
                values.append(ctypes.c_void_p(data.ctypes.data))
            else:
                assert type(arg) is _SCALARS[c][0], f"{self.name} {name}: {c} expected, got {type(arg)}"
                values.append(_SCALARS[c][1](arg.item()))
        outputs = []
        for kind, _, _ in self.outputs:
            out = _array(np.empty(shape, dtype=_SCALARS[ctype[kind]][0]))
            outputs.append(out)
            values.append(ctypes.c_void_p(out.ctypes.data))
        launched.append(self.name)
        self.compiled[key](*values)
        return tuple(outputs) if self.return_tuple or len(outputs) > 1 else outputs[0]

    def _build(self, ctype: dict[str, str], is_array: tuple[bool, ...]) -> Any:
        params, loads, stores = ["long long n"], [], []
        for (kind, name, raw), array in zip(self.inputs, is_array, strict=True):
            c = ctype[kind]
            if raw:
                params.append(f"const {c}* {name}")
            elif array:
                params.append(f"const {c}* {name}_p")
                loads.append(f"const {c} {name} = {name}_p[i];")
            else:
                params.append(f"{c} {name}")
        for kind, name, _ in self.outputs:
            params.append(f"{ctype[kind]}* {name}_p")
            loads.append(f"{ctype[kind]} {name};")
            stores.append(f"{name}_p[i] = {name};")
        body = "\n".join([*loads, "{", self.operation, "}", *stores])
        loop = f"for (ptrdiff_t i = 0; i < n; ++i) {{\n{body}\n}}"
        source = f'{_PRELUDE}extern "C" void kernel({", ".join(params)}) {{\n{loop}\n}}\n'
        return _compile(source, self.options).kernel


class _Array(np.ndarray):
    """A NumPy array that answers ``.device.id`` as a CuPy array does."""

    device = types.SimpleNamespace(id=0)


def _array(value: Any) -> _Array:
    return np.asarray(value).view(_Array)


def install(multiprocessors: int) -> None:
    """Make ``import cupy`` give the stand-in (before portable_bn._backends.cupy is imported)."""
    fake = types.ModuleType("cupy")
    fake.ndarray = _Array
    fake.float32, fake.float64 = np.float32, np.float64
    fake.ascontiguousarray = lambda x: _array(np.ascontiguousarray(x))
    fake.empty = lambda shape, dtype=np.float64: _array(np.empty(shape, dtype))
    fake.RawModule = RawModule
    fake.ElementwiseKernel = ElementwiseKernel
    attributes = {"MultiProcessorCount": multiprocessors}
    fake.cuda = types.SimpleNamespace(Device=lambda _: types.SimpleNamespace(attributes=attributes))
    sys.modules["cupy"] = fake


def main() -> int:
    """The cases; returns the number of failures."""
    install(multiprocessors=3)  # 12 reduction blocks in all: several per channel
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import array_api_compat.numpy as xp

    from portable_bn import _agnostic, _dispatch
    from portable_bn._backends import cupy as cupy_backend
    from portable_bn._recipe import make_recipe
    from portable_bn.testing import (
        dtype_error,
        reference_backward,
        reference_batch_norm,
        reference_moments,
        tolerance,
    )

    kernels, pure = cupy_backend.CupyPrimitives(xp), _dispatch.pure(xp)
    failures: list[str] = []

    def expect(label: str, got: Any, want: Any, dtype: str) -> None:
        if (got is None) != (want is None):
            failures.append(f"{label}: None mismatch")
            return
        if got is None:
            return
        error = dtype_error(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64), dtype)
        if not error <= tolerance(dtype):
            failures.append(f"{label}: error {error:.2e}")

    def forward(x_host, dtype, *, axis=1, training=True, affine=True, running=True, factor=0.1, skip=False,
                truth="reference", strided_vectors=False):  # fmt: skip
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
        momentum = 0.5 if factor is None else factor
        arg = _array(np.asarray(momentum, dtype=dtype)) if factor is None else factor  # a module's 0-d factor
        args = (x, *vectors.values(), recipe)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if training:
                got = _agnostic.train_forward(kernels, *args, factor=arg, eps=1e-5, skip_nonfinite=skip)
            else:
                got = _agnostic.eval_forward(kernels, *args, eps=1e-5)
            numpy_args = [np.asarray(a).copy() if a is not None else None for a in (x, *vectors.values())]
            if truth == "reference":
                want = reference_batch_norm(
                    *(None if a is None else a.astype(np.float64) for a in numpy_args),
                    training=training, momentum=momentum, axis=axis,
                )  # fmt: skip
            else:  # the pure primitives (data beyond the reference's float64 sums, skip_nonfinite)
                method = _agnostic.train_forward if training else _agnostic.eval_forward
                extra = {"factor": momentum, "skip_nonfinite": skip} if training else {}
                want = method(pure, *numpy_args, recipe, eps=1e-5, **extra)._asdict()
        label = f"{dtype} {x_host.shape} axis={axis} training={training} affine={affine} running={running} skip={skip}"
        if not (got.output.dtype == x.dtype and got.output.shape == x.shape):
            failures.append(f"{label}: output dtype or shape")
        for name in ("output", "running_mean", "running_var", "mean", "invstd"):
            expect(f"{label} {name}", getattr(got, name), want[name], dtype)

    def backward(x_host, dtype, *, axis=1, training=True, affine=True):
        rng = np.random.default_rng(7)
        x, grad = _array(x_host.astype(dtype)), _array(rng.normal(size=x_host.shape).astype(dtype))
        weight = _array(rng.uniform(0.5, 2, x_host.shape[axis]).astype(dtype)) if affine else None
        recipe = make_recipe(tuple(x.shape), axis)
        stats = _agnostic.train_forward(pure, np.asarray(x), None, None, None, None, recipe,
                                        factor=0.1, eps=1e-5, skip_nonfinite=False)  # fmt: skip
        mean, invstd = _array(stats.mean), _array(stats.invstd)
        got = _agnostic.backward(kernels, grad, x, weight, mean, invstd, recipe, training=training)
        host = [None if a is None else np.asarray(a, dtype=np.float64) for a in (grad, x, weight, mean, invstd)]
        want = reference_backward(*host, training=training, axis=axis)
        label = f"backward {dtype} {x_host.shape} axis={axis} training={training} affine={affine}"
        for name, value, expected in zip(("grad_input", "grad_weight", "grad_bias"), got, want, strict=True):
            if value.dtype != x.dtype:
                failures.append(f"{label} {name}: dtype {value.dtype}")
            expect(f"{label} {name}", value, expected, dtype)

    def moments(x_host, dtype, *, axis=1, label=""):
        """The block-moments kernel against the pure primitive (which channels are not finite;
        the others' scale, exactly) and the float64 reference of ``x * scale`` (mean and M2 to
        65 float64 ulps: the kernel accumulates in float64 whatever the input's dtype)."""
        x = _array(x_host.astype(dtype))
        recipe = make_recipe(tuple(x.shape), axis)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = kernels.block_moments(x, recipe)
            want = pure.block_moments(np.asarray(x), recipe)
        label = f"block_moments {dtype} {x_host.shape} axis={axis} {label}"
        if not all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in got):
            failures.append(f"{label}: not four float64 arrays")
            return
        shift, mean, m2, scale = got
        finite = np.isfinite(shift + mean + m2)
        want_finite = np.isfinite(np.asarray(want[0] + want[1], dtype=np.float64) + want[2])
        if not np.array_equal(finite, want_finite):
            failures.append(f"{label}: finite channels {finite} != {want_finite}")
        if not np.array_equal(scale[finite], np.asarray(want[3], dtype=np.float64)[finite]):  # others: any
            failures.append(f"{label}: scale {scale} != {want[3]}")
        if not finite.all():
            return
        shape = [1] * x.ndim
        shape[axis] = -1
        _, ref_mean, ref_m2 = reference_moments(np.asarray(x, dtype=np.float64) * scale.reshape(shape), axis=axis)
        bound = 2.0**-52 * 65
        spread = np.sqrt(ref_m2 / x.size * x.shape[axis])
        mean_error = np.abs((shift + mean) - ref_mean) / (np.abs(ref_mean) + spread + 1e-300)
        m2_error = np.abs(m2 - ref_m2) / np.where(ref_m2 > 0, ref_m2, 1.0)
        if not (mean_error.max() <= bound and m2_error.max() <= bound):
            failures.append(f"{label}: mean error {mean_error.max():.2e}, M2 error {m2_error.max():.2e} (relative)")
        uniform = ref_m2 == 0
        if uniform.any() and not (np.all(mean[uniform] == 0) and np.all(m2[uniform] == 0)):
            failures.append(f"{label}: a constant channel's mean or M2 not exactly 0")

    rng = np.random.default_rng(2)
    spans = 3.0 + 2.0 * rng.normal(size=(16, 2, 1000))  # 6 blocks a channel, cut inside rows
    mixed = spans.copy()
    mixed[8:, 1] *= 1e6  # blocks of different scales in one channel
    uniform = rng.normal(size=(8, 3, 40, 40))
    uniform[:, 0], uniform[:, 2] = 4e16, 0.0  # constant channels
    for dtype in ("float32", "float64"):
        moments(spans, dtype, label="several blocks")
        moments(mixed, dtype, label="blocks of several scales")
        moments(uniform, dtype, label="constant channels")
        moments(0.5 * rng.normal(size=(4, 3, 7)), dtype, label="one block, scale 1")
        moments(rng.normal(size=(5, 6, 3, 4)), dtype, axis=-1)
        moments(rng.normal(size=(600, 2)), dtype)
        forward(spans, dtype)
        forward(mixed, dtype)
        special = rng.normal(size=(6, 5, 7))
        special[2, 3, 4], special[1, 4, 0] = np.nan, np.inf
        moments(special, dtype, label="NaN and Inf channels")
    far = 1e4 + 0.1 * rng.normal(size=(16, 2, 1000))
    moments(far, "float64", label="1e4 + 0.1 N(0, 1)")
    forward(far, "float64")
    moments(1e300 + 1e299 * rng.normal(size=(16, 2, 1000)), "float64", label="near 1e300")
    moments(rng.uniform(1e308, 1.7e308, size=(8, 3, 40)), "float64", label="near the largest float64")
    moments(np.clip(3e38 + 1e37 * rng.normal(size=(16, 2, 1000)), -3.4e38, 3.4e38), "float32", label="near 3e38")
    for dtype in ("float32", "float64"):
        for shape, axis in (((4, 3, 7), 1), ((5, 6, 3, 4), -1), ((8, 3, 40, 40), 1), ((600, 2), 1)):
            x_host = 3.0 + 2.0 * rng.normal(size=shape)
            forward(x_host, dtype, axis=axis)
            forward(x_host, dtype, axis=axis, affine=False, factor=None)
            forward(x_host, dtype, axis=axis, running=False)
            forward(x_host, dtype, axis=axis, training=False)
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
        forward(special, dtype, skip=True, truth="pure")  # NaN/Inf channels keep their running values
    for offset, spread in ((1e4, 0.1), (1e20, 1e19), (-3e38, 1e37), (0.0, 3e37)):
        forward(np.clip(offset + spread * rng.normal(size=(8, 3, 4, 4)), -3.4e38, 3.4e38), "float32")
    constant = rng.normal(size=(8, 3, 4, 4))
    constant[:, 0] = 4e16
    forward(constant, "float32")
    for offset, spread in ((1e12, 1.0), (1e300, 1e299), (0.0, 1e-300)):
        forward(offset + spread * rng.normal(size=(8, 3, 4, 4)), "float64", truth="pure")
    for shape, training, sequence in (  # the launches of a call
        ((8, 3, 40, 40), True, ["pbn_block_moments", "pbn_merge_moments", "pbn_about_the_mean",
                                "pbn_moments_vectors", "pbn_affine"]),
        ((8, 3, 40, 40), False, ["pbn_eval_vectors", "pbn_affine"]),
    ):  # fmt: skip
        launched.clear()
        forward(np.random.default_rng(4).normal(size=shape), "float32", training=training)
        if launched != sequence:
            failures.append(f"{shape} training={training}: launched {launched}, expected {sequence}")
    cupy_backend._WIDE_FROM = 0  # the 64-bit index kernels
    cupy_backend._plan.cache_clear()
    x_host = -1.0 + rng.normal(size=(8, 3, 40, 40))
    forward(x_host, "float32")
    forward(x_host, "float64", training=False)
    backward(x_host, "float64")
    for failure in failures:
        print("FAIL", failure)
    print(f"{len(failures)} failures")
    return len(failures)


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
