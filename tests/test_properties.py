"""Property-based tests (hypothesis) on every selected (backend, device, dtype).

Random shapes (2-D to 5-D, N = 0, N = 1 with spatial size > 1, C = 1), any
valid channel axis, momentum in [0, 1], eps in [1e-6, 1], with or without
weight, bias and running statistics, training and evaluation. The
properties:

1. every result equals the float64 reference on the backend's own (cast)
   input, within :func:`~portable_bn.testing.tolerance`;
2. a training output without affine parameters has per-channel mean 0 and
   variance ``var / (var + eps)``;
3. normalizing ``a * x + b`` (``a > 0``) with ``eps * a**2`` gives the output
   of ``x`` with ``eps``, and statistics that transform accordingly;
4. permuting the batch permutes the output and leaves the statistics alone;
5. valid arguments never raise, invalid ones raise a TypeError or ValueError
   naming the problem, and no argument is ever written to;
6. a module driven through random training and evaluation steps matches
   :class:`~portable_bn.testing.ReferenceModule` at every step.

Each test takes the ``vcombo`` fixture (backend, device, dtype) and runs a
nested ``@given`` property, so that the example count can depend on the
backend. Counts come from the hypothesis profile (``PBN_HYPOTHESIS_PROFILE``,
see tests/conftest.py). JAX compiles every new shape, Dask builds and
computes a graph per call and ndonnx evaluates a one-node ONNX model per
operation, so they run a fifth of the profile's examples and,
except under the ``fuzz`` profile, JAX draws its layouts from a small pool
that still holds every edge case (see :func:`examples` and :func:`layouts`).
Data are seeded NumPy noise around a per-channel offset, so a falsifying
example prints as a few numbers and a seed.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, note, seed, settings
from hypothesis import strategies as st

import portable_bn as pbn
from portable_bn.testing import Combination, ReferenceModule, max_error, reference_batch_norm, tolerance

PROFILE = os.environ.get("PBN_HYPOTHESIS_PROFILE", "ci")
COST = {"jax": 5, "jax_gpu": 5, "dask": 5, "ndonnx": 5}
"""Backends that are slow per example run the profile's max_examples / COST."""
HALF = ("float16", "bfloat16")
MANTISSA_BITS = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}
PARAMETERS = ("weight", "bias", "running_mean", "running_var")
MODULES = {2: pbn.BatchNorm1d, 3: pbn.BatchNorm1d, 4: pbn.BatchNorm2d, 5: pbn.BatchNorm3d}

Layout = tuple[tuple[int, ...], int]
"""(shape, channel axis as given, possibly negative)."""

JAX_LAYOUTS: tuple[Layout, ...] = (
    ((6, 3), 1),
    ((6, 3), -1),
    ((1, 2, 5), 1),  # N = 1, L = 5
    ((0, 3, 2), 1),  # empty batch
    ((4, 1, 3), -2),  # C = 1
    ((3, 4, 2), 0),  # channel axis 0
    ((3, 2, 2, 3), -1),  # channels-last
    ((2, 3, 2, 1, 2), 1),
)
"""What JAX draws from outside the fuzz profile: a new shape costs it ~0.5 s of compilation."""


def examples(combo: Combination) -> Callable[[Any], Any]:
    """Decorator for a ``@given`` property of ``combo``: the active profile,
    with max_examples divided by the backend's COST. Under a derandomized
    profile (ci), each (property, combination) pair gets its own fixed seed,
    so that the combinations explore different examples, reproducibly."""

    def apply(test: Any) -> Any:
        test = settings(max_examples=max(3, settings.default.max_examples // COST.get(combo.backend, 1)))(test)
        if settings.default.derandomize:
            test = seed(f"{test.__qualname__} {combo.id}")(test)
        return test

    return apply


def count_per_channel(layout: Layout) -> int:
    shape, axis = layout
    return math.prod(size for i, size in enumerate(shape) if i != axis % len(shape))


def to_host(combo: Combination, *arrays: Any) -> list[np.ndarray | None]:
    """Float64 NumPy copies (None stays None); Dask arrays are computed together, in one pass."""
    present = [a for a in arrays if a is not None]
    if combo.lazy:
        import dask

        present = list(dask.compute(*present))
    values = iter(present)
    return [None if a is None else combo.to_numpy(next(values)) for a in arrays]


# ------------------------------------------------------------------ strategies
MOMENTA = st.one_of(st.sampled_from([0.0, 0.1, 0.5, 1.0]), st.floats(0.0, 1.0))
EPSILONS = st.one_of(st.sampled_from([1e-5, 1e-3]), st.floats(1e-6, 1.0))
MOSTLY = st.sampled_from([True, True, False])
"""True twice as often as False (training calls and running updates have more to check)."""
SIZES = st.integers(1, 4)
SEEDS = st.integers(0, 2**32 - 1)
OFFSETS = st.floats(-100.0, 100.0)
SPREADS = st.one_of(st.floats(-1.0, 1.0).map(lambda e: 10.0**e), st.just(0.0))
"""Log-uniform in [0.1, 10], so offset/spread ratios up to 1000 are common; 0: a constant channel."""


@st.composite
def layouts(
    draw: st.DrawFn,
    combo: Combination,
    *,
    ranks: tuple[int, ...] = (2, 3, 4, 5),
    min_batch: int = 0,
    min_count: int = 0,
    batch_axis_free: bool = False,
) -> Layout:
    """A shape and a channel axis (any valid one, negative too).

    Sizes: N in [min_batch, 5], C in [1, 4], other axes in [1, 4], so N = 0,
    N = 1 with spatial size > 1 and C = 1 all come up. ``batch_axis_free``:
    the channel axis is not axis 0. ``min_count``: at least that many values
    per channel.
    """

    def fits(layout: Layout) -> bool:
        shape, axis = layout
        return (
            len(shape) in ranks
            and shape[0] >= min_batch
            and count_per_channel(layout) >= min_count
            and not (batch_axis_free and axis % len(shape) == 0)
        )

    if combo.backend.startswith("jax") and PROFILE != "fuzz":
        return draw(st.sampled_from([layout for layout in JAX_LAYOUTS if fits(layout)]))
    rank = draw(st.sampled_from(ranks))
    axes = [a for a in range(-rank, rank) if not (batch_axis_free and a % rank == 0)]
    axis = draw(st.sampled_from(axes))
    shape = tuple(draw(st.integers(min_batch, 5) if i == 0 and i != axis % rank else SIZES) for i in range(rank))
    assume(fits((shape, axis)))
    return shape, axis


@dataclass(frozen=True)
class Data:
    """Per channel ``offset + spread * N(0, 1)`` noise from ``seed``; spread 0
    is a constant channel (its offset a multiple of 1/8, so that every dtype
    sums it exactly: zero variance, where only eps keeps invstd finite)."""

    shape: tuple[int, ...]
    axis: int
    offsets: tuple[float, ...]
    spreads: tuple[float, ...]
    seed: int

    def host(self) -> np.ndarray:
        along_channels = [1] * len(self.shape)
        along_channels[self.axis] = len(self.offsets)
        offsets = np.reshape(self.offsets, along_channels)
        spreads = np.reshape(self.spreads, along_channels)
        noise = np.random.default_rng(self.seed).standard_normal(self.shape)
        result: np.ndarray = offsets + spreads * noise
        return result

    def with_batch(self, batch: int, seed: int) -> Data:
        return Data((batch, *self.shape[1:]), self.axis, self.offsets, self.spreads, seed)


@st.composite
def datas(draw: st.DrawFn, layout: Layout) -> Data:
    """Moderate magnitudes: offsets in [-100, 100], spreads in [0.1, 10] or 0."""
    shape, axis = layout
    offsets, spreads = [], []
    for _ in range(shape[axis]):
        spread, offset = draw(SPREADS), draw(OFFSETS)
        offsets.append(round(offset * 8) / 8 if spread == 0.0 else offset)
        spreads.append(spread)
    return Data(shape, axis, tuple(offsets), tuple(spreads), draw(SEEDS))


@functools.cache
def vectors(channels: int, low: float, high: float) -> st.SearchStrategy[tuple[float, ...]]:
    return st.tuples(*[st.floats(low, high) for _ in range(channels)])


def maybe(strategy: st.SearchStrategy[Any], present: bool | None) -> st.SearchStrategy[Any]:
    """``strategy`` (present=True), None (False) or either (None)."""
    if present is None:
        return st.one_of(st.none(), strategy)
    return strategy if present else st.none()


@dataclass(frozen=True)
class Call:
    """One :func:`~portable_bn.batch_norm` call, as host data and options."""

    data: Data
    training: bool
    momentum: float
    eps: float
    weight: tuple[float, ...] | None
    bias: tuple[float, ...] | None
    running_mean: tuple[float, ...] | None
    running_var: tuple[float, ...] | None
    param_dtype: str
    """"input" (the input's dtype) or "float32" (the mixed rule for float16/bfloat16 input)."""

    def on(self, combo: Combination) -> tuple[Any, dict[str, Any]]:
        """The input and the per-channel arrays on ``combo``."""
        dtype = combo.dtype if self.param_dtype == "input" else combo.library.float32
        params = {name: getattr(self, name) for name in PARAMETERS}
        arrays = {k: None if v is None else combo.asarray(np.array(v), dtype) for k, v in params.items()}
        return combo.asarray(self.data.host()), arrays

    def options(self) -> dict[str, Any]:
        return {"training": self.training, "momentum": self.momentum, "eps": self.eps, "axis": self.data.axis}


@st.composite
def calls(
    draw: st.DrawFn,
    combo: Combination,
    *,
    training: bool | None = None,
    running: bool | None = None,
    unit_affine: bool = False,
    **layout_constraints: Any,
) -> Call:
    """A valid call: training with n != 1, evaluation with running statistics.

    ``unit_affine``: weight absent or all ones, bias absent or all zeros.
    """
    layout = draw(layouts(combo, **layout_constraints))
    channels = layout[0][layout[1]]
    training = draw(MOSTLY) if training is None else training
    assume(not (training and count_per_channel(layout) == 1))
    if not training:
        running = True
    if unit_affine:
        weight = draw(maybe(st.just((1.0,) * channels), None))
        bias = draw(maybe(st.just((0.0,) * channels), None))
    else:
        weight = draw(maybe(vectors(channels, -2.0, 2.0), None))
        bias = draw(maybe(vectors(channels, -10.0, 10.0), None))
    with_running = draw(MOSTLY) if running is None else running
    return Call(
        data=draw(datas(layout)),
        training=training,
        momentum=draw(MOMENTA),
        eps=draw(EPSILONS),
        weight=weight,
        bias=bias,
        running_mean=draw(vectors(channels, -100.0, 100.0)) if with_running else None,
        running_var=draw(vectors(channels, 0.01, 100.0)) if with_running else None,
        param_dtype=draw(st.sampled_from(["float32", "input"])) if combo.dtype_name in HALF else "input",
    )


def run(combo: Combination, call: Call, x: Any = None) -> tuple[pbn.BatchNormResult, dict[str, Any]]:
    """batch_norm on ``combo`` (input ``x`` if given); returns the result and the reference's."""
    x_given, arrays = call.on(combo)
    x = x_given if x is None else x
    result = pbn.batch_norm(x, **arrays, **call.options())
    x_host, *params = to_host(combo, x, *arrays.values())
    expected = reference_batch_norm(x_host, **dict(zip(PARAMETERS, params, strict=True)), **call.options())
    return result, expected


def errors_against(combo: Combination, result: pbn.BatchNormResult, expected: dict[str, Any]) -> dict[str, float]:
    """max_error of every field of ``result`` (inf where one of them is None and the other not)."""
    values = to_host(combo, *result)
    errors = {}
    for name, value in zip(result._fields, values, strict=True):
        want = expected[name]
        if want is None or value is None:
            errors[name] = 0.0 if want is None and value is None else math.inf
        else:
            errors[name] = max_error(value, want)
    return errors


# ------------------------------------------------------------------ properties
def test_batch_norm_matches_the_float64_reference(vcombo):
    """Property 1: output, new running statistics, mean and invstd are the
    float64 reference's on the cast input, within the dtype's tolerance, for
    any shape, axis, momentum, eps and set of optional arguments."""
    tol = tolerance(vcombo.dtype_name)

    @examples(vcombo)
    @given(call=calls(vcombo))
    def check(call: Call) -> None:
        result, expected = run(vcombo, call)
        errors = errors_against(vcombo, result, expected)
        note(f"errors {errors}")
        assert all(error <= tol for error in errors.values()), f"above {tol:.1e}: {errors}"

    check()


def test_training_output_is_normalized(vcombo):
    """Property 2: without weight and bias (or with weight 1 and bias 0), a
    training output has per-channel mean 0 and variance ``var / (var + eps)``
    (= ``1 - eps * invstd**2``, invstd from the reference), up to rounding."""
    tol = tolerance(vcombo.dtype_name)

    @examples(vcombo)
    @given(call=calls(vcombo, training=True, unit_affine=True, min_count=2))
    def check(call: Call) -> None:
        result, expected = run(vcombo, call)
        (output,) = to_host(vcombo, result.output)
        assert output is not None
        per_channel = np.moveaxis(output, call.data.axis, 0).reshape(output.shape[call.data.axis], -1)
        scale = max(1.0, float(np.abs(output).max()))  # each value is within tol * scale (property 1)
        mean, variance = per_channel.mean(axis=1), per_channel.var(axis=1)
        want_variance = 1.0 - call.eps * expected["invstd"] ** 2
        note(f"mean {mean}, variance {variance}, expected variance {want_variance}")
        assert np.all(np.abs(mean) <= 2 * tol * scale)
        assert np.all(np.abs(variance - want_variance) <= 4 * tol * scale**2)

    check()


@dataclass(frozen=True)
class AffineCase:
    """A training call and a per-channel map ``a * x + b`` that the dtype holds exactly."""

    call: Call
    a: float
    b: float
    grid: float
    """``x`` is rounded to a multiple of ``grid`` (a power of two)."""

    def inputs(self) -> tuple[np.ndarray, np.ndarray]:
        x = np.round(self.call.data.host() / self.grid) * self.grid
        return x, self.a * x + self.b


@st.composite
def affine_cases(draw: st.DrawFn, combo: Combination) -> AffineCase:
    """``a`` in [0.5, 2] and ``b`` in [-10, 10], chosen with the data so that
    ``x`` and ``a * x + b`` are both exactly representable in the dtype.

    ``a = m / 2**k`` has at most ``k + 2`` significant bits; ``x`` is rounded
    to a power-of-two grid ``g`` and ``b`` to ``g / 2**k``, so ``a * x + b``
    is a multiple of ``g / 2**k``; ``g`` is the finest grid on which those
    multiples fit the dtype's mantissa. Half precision gets fewer bits of
    ``a`` to leave more for the data.
    """
    call = draw(calls(combo, training=True, running=False, min_count=2))
    k = {"bfloat16": 2, "float16": 3}.get(combo.dtype_name, 6)
    a = draw(st.integers(2 ** (k - 1), 2 ** (k + 1))) / 2**k
    b = draw(st.floats(-10.0, 10.0))
    largest = float(np.abs(call.data.host()).max(initial=1.0))
    digits = 2.0 ** MANTISSA_BITS[combo.dtype_name]
    grid = 2.0 ** math.ceil(math.log2(2**k * (2 * largest + 11) / digits))
    while True:
        step = grid / 2**k
        case = AffineCase(call, a, round(b / step) * step, grid)
        x, moved = case.inputs()
        if np.abs(x).max(initial=0) <= digits * grid and np.abs(moved).max(initial=0) <= digits * step:
            return case
        grid *= 2


def test_affine_change_of_input_is_normalized_away(vcombo):
    """Property 3: per-channel ``a * x + b`` (``a > 0``) normalized with
    ``eps * a**2`` gives exactly, in real arithmetic, the output of ``x`` with
    ``eps``, a batch mean ``a * mean + b`` and an invstd ``invstd / a``.
    Inputs are chosen so that the dtype holds ``x`` and ``a * x + b`` exactly
    (checked); each side then carries only its own rounding (tol each)."""
    tol = tolerance(vcombo.dtype_name)

    @examples(vcombo)
    @given(case=affine_cases(vcombo))
    def check(case: AffineCase) -> None:
        x_host, moved_host = case.inputs()
        x, moved = vcombo.asarray(x_host), vcombo.asarray(moved_host)
        cast_x, cast_moved = to_host(vcombo, x, moved)
        assert np.array_equal(cast_x, x_host) and np.array_equal(cast_moved, moved_host), "inputs not exact"
        _, arrays = case.call.on(vcombo)
        options = case.call.options()
        plain = pbn.batch_norm(x, **arrays, **options)
        shifted = pbn.batch_norm(moved, **arrays, **{**options, "eps": case.call.eps * case.a**2})
        out, mean, invstd, out2, mean2, invstd2 = (
            np.asarray(v)
            for v in to_host(
                vcombo, plain.output, plain.mean, plain.invstd, shifted.output, shifted.mean, shifted.invstd
            )
        )
        assert max_error(out2, out) <= 2 * tol, "output"
        assert max_error(case.a * invstd2, invstd) <= 2 * tol, "invstd"
        mean_bound = tol * (2 * max(1.0, np.abs(mean).max(initial=0)) + max(1.0, np.abs(mean2).max(initial=0)))
        mean_error = np.abs(case.a * mean + case.b - mean2).max(initial=0)
        note(f"mean error {mean_error:.3g} (bound {mean_bound:.3g})")
        assert mean_error <= mean_bound, "mean"

    check()


def test_permuting_the_batch_permutes_the_output(vcombo):
    """Property 4: the order of the samples does not matter: permuting axis
    0 (not the channel axis) permutes the output and leaves mean, invstd and
    the running statistics unchanged, up to the rounding of sums taken in
    another order (tol on each side)."""
    tol = tolerance(vcombo.dtype_name)

    @examples(vcombo)
    @given(call=calls(vcombo, min_batch=2, batch_axis_free=True), data=st.data())
    def check(call: Call, data: st.DataObject) -> None:
        order = np.array(data.draw(st.permutations(range(call.data.shape[0])), label="order"))
        x_host = call.data.host()
        result, _ = run(vcombo, call)
        permuted, _ = run(vcombo, call, x=vcombo.asarray(x_host[order]))
        values, permuted_values = to_host(vcombo, *result), to_host(vcombo, *permuted)
        values[0] = None if values[0] is None else values[0][order]
        for name, want, got in zip(result._fields, values, permuted_values, strict=True):
            assert (want is None) == (got is None), name
            if want is not None:
                assert max_error(got, want) <= 2 * tol, name

    check()


DEFECT_MODES = {
    "eps_not_positive_in_training": True,
    "one_value_per_channel_in_training": True,
    "eval_without_running": False,
}
"""Defects that only exist in training (True) or in evaluation (False); the others are drawn in either."""
DEFECTS: dict[str, tuple[type[Exception], str]] = {
    # name: (exception, what the message must mention)
    "weight_length": (ValueError, "weight"),
    "bias_length": (ValueError, "bias"),
    "running_length": (ValueError, "running_"),
    "one_running_buffer": (ValueError, "together"),
    "eps_not_positive_in_training": (ValueError, "eps"),
    "eps_negative": (ValueError, "eps"),
    "one_value_per_channel_in_training": (ValueError, "more than 1 value per channel"),
    "eval_without_running": (ValueError, "training=False"),
    "axis_out_of_range": (ValueError, "axis"),
    "axis_not_int": (TypeError, "axis"),
    "parameter_dtype": (TypeError, "dtype"),
    "momentum_not_finite": (ValueError, "momentum"),
    "training_not_bool": (TypeError, "training"),
}


@st.composite
def defective_calls(draw: st.DrawFn, combo: Combination) -> tuple[Any, dict[str, Any], str | None]:
    """A valid call with at most one defect: (x, keyword arguments, defect or None)."""
    defect = draw(st.one_of(st.none(), st.sampled_from(sorted(DEFECTS))))
    call = draw(calls(combo, training=DEFECT_MODES.get(defect or "")))
    if defect == "one_value_per_channel_in_training":
        shape, axis = call.data.shape, call.data.axis
        single = tuple(size if i == axis % len(shape) else 1 for i, size in enumerate(shape))
        call = replace(call, data=replace(call.data, shape=single))
    x, arrays = call.on(combo)
    kwargs = {**arrays, **call.options()}
    channels = call.data.shape[call.data.axis]
    param_dtype = arrays["weight"].dtype if arrays["weight"] is not None else None
    wrong_length = channels + draw(st.sampled_from([-1, 1] if channels > 1 else [1]))

    def vector(length: int, dtype: Any = None) -> Any:
        return combo.asarray(np.linspace(0.5, 1.5, length), dtype if dtype is not None else param_dtype)

    if defect in ("weight_length", "bias_length"):
        kwargs[defect.removesuffix("_length")] = vector(wrong_length)
    elif defect == "running_length":
        name = draw(st.sampled_from(["running_mean", "running_var"]))
        kwargs["running_mean"], kwargs["running_var"] = vector(channels), vector(channels)
        kwargs[name] = vector(wrong_length)
    elif defect == "eval_without_running":
        kwargs["running_mean"] = kwargs["running_var"] = None
    elif defect == "one_running_buffer":
        name = draw(st.sampled_from(["running_mean", "running_var"]))
        kwargs["running_mean"] = kwargs["running_var"] = None
        kwargs[name] = vector(channels)
    elif defect == "eps_not_positive_in_training":
        kwargs["eps"] = draw(st.sampled_from([0.0, -0.0, -1e-5]))
    elif defect == "eps_negative":
        kwargs["eps"] = -draw(st.floats(1e-12, 1.0))
    elif defect == "axis_out_of_range":
        ndim = len(call.data.shape)
        kwargs["axis"] = draw(st.sampled_from([ndim, ndim + 2, -ndim - 1]))
    elif defect == "axis_not_int":
        kwargs["axis"] = draw(st.sampled_from([1.0, "1", None, True]))
    elif defect == "parameter_dtype":
        wrong = combo.library.float32 if combo.dtype_name == "float64" else combo.library.float64
        if combo.backend == "jax_x32":  # no float64 there: another dtype that does not fit
            wrong = combo.library.bfloat16 if combo.dtype_name == "float16" else combo.library.float16
        name = draw(st.sampled_from(PARAMETERS))
        kwargs["running_mean"], kwargs["running_var"] = vector(channels), vector(channels)
        kwargs[name] = vector(channels, wrong)
    elif defect == "momentum_not_finite":
        kwargs["momentum"] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    elif defect == "training_not_bool":
        kwargs["training"] = draw(st.sampled_from([1, 0, "yes", None, np.True_]))
    return x, kwargs, defect


def test_errors_are_clean_and_change_nothing(vcombo):
    """Property 5: a valid call never raises; a call with one defect (wrong
    channel count, eps <= 0 in training, n == 1 in training, a lone running
    buffer, ...) raises the documented TypeError or ValueError with a message
    naming the problem; and no input array is ever changed, either way."""

    @examples(vcombo)
    @given(case=defective_calls(vcombo))
    def check(case: tuple[Any, dict[str, Any], str | None]) -> None:
        x, kwargs, defect = case
        arrays = {"x": x, **{k: v for k, v in kwargs.items() if k in PARAMETERS and v is not None}}
        before = dict(zip(arrays, to_host(vcombo, *arrays.values()), strict=True))
        if defect is None:
            result = pbn.batch_norm(x, **kwargs)
            assert tuple(result.output.shape) == tuple(x.shape) and result.output.dtype == x.dtype
        else:
            error, mentions = DEFECTS[defect]
            with pytest.raises(error, match=re.escape(mentions)):
                pbn.batch_norm(x, **kwargs)
        after = dict(zip(arrays, to_host(vcombo, *arrays.values()), strict=True))
        for name in arrays:
            np.testing.assert_array_equal(after[name], before[name], err_msg=f"{name} was written to")

    check()


@dataclass(frozen=True)
class ModuleRun:
    """A module's options, an initial state and its steps (training?, data)."""

    rank: int
    channels: int
    options: dict[str, Any]
    eager: bool
    """Created with xp= (else lazily, at the first call)."""
    state: dict[str, tuple[float, ...]]
    """Loaded before the first step (eager modules only)."""
    steps: tuple[tuple[bool, Data], ...]


@st.composite
def module_runs(draw: st.DrawFn, combo: Combination) -> ModuleRun:
    rank = draw(st.sampled_from(sorted(MODULES)))
    shape, axis = draw(layouts(combo, ranks=(rank,)))
    channels = shape[axis]
    options = {
        "eps": draw(EPSILONS),
        "momentum": draw(st.one_of(st.none(), MOMENTA)),
        "affine": draw(st.booleans()),
        "track_running_stats": draw(st.booleans()),
        "axis": axis,
    }
    eager = draw(st.booleans())
    state = {}
    if eager and options["affine"] and draw(st.booleans()):
        state.update(weight=draw(vectors(channels, -2.0, 2.0)), bias=draw(vectors(channels, -10.0, 10.0)))
    if eager and options["track_running_stats"] and draw(st.booleans()):
        state.update(
            running_mean=draw(vectors(channels, -100.0, 100.0)), running_var=draw(vectors(channels, 0.01, 100))
        )
    first = draw(datas((shape, axis)))
    # N varies per step, except where axis 0 is the channel axis, and for JAX
    # (a new shape costs it a compilation) outside the fuzz profile.
    fixed_batch = axis % rank == 0 or (combo.backend.startswith("jax") and PROFILE != "fuzz")
    batches = st.just(shape[0]) if fixed_batch else st.integers(0, 5)
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        training, batch = draw(st.booleans()), draw(batches)
        steps.append((training, first.with_batch(batch, draw(SEEDS))))
    return ModuleRun(rank, channels, options, eager, state, tuple(steps))


def test_module_steps_match_the_reference_module(vcombo):
    """Property 6: a BatchNorm module and ReferenceModule, started from the
    same state, agree after every random training or evaluation step (output
    and state; num_batches_tracked exactly), for any flags and momentum (None
    too). Each step starts the reference from the module's current state, so
    each transition is checked on its own, without float64/float32 drift. A
    step with one value per channel that needs batch statistics raises
    ValueError and changes no state."""
    tol = tolerance(vcombo.dtype_name)
    param_dtype = vcombo.param_dtype

    @examples(vcombo)
    @given(plan=module_runs(vcombo))
    def check(plan: ModuleRun) -> None:
        where = {"xp": vcombo.library, "device": vcombo.device, "dtype": param_dtype} if plan.eager else {}
        module = MODULES[plan.rank](plan.channels, **plan.options, **where)
        reference = ReferenceModule(plan.channels, **plan.options)
        if plan.state:
            module.load_state_dict({k: np.array(v) for k, v in plan.state.items()}, strict=False)
        for step, (training, data) in enumerate(plan.steps):
            module.train(training)
            reference.training = training
            state = module.state_dict()
            host_state = dict(zip(state, to_host(vcombo, *state.values()), strict=True))
            reference.state.update(host_state)
            if "num_batches_tracked" in host_state:
                reference.state["num_batches_tracked"] = int(host_state["num_batches_tracked"])
            x = vcombo.asarray(data.host())
            batch_statistics = training or not plan.options["track_running_stats"]
            if batch_statistics and count_per_channel((data.shape, data.axis)) == 1:
                with pytest.raises(ValueError, match="more than 1 value per channel"):
                    module(x)
                after = module.state_dict()
                assert list(after) == list(state)
                for key, value in zip(after, to_host(vcombo, *after.values()), strict=True):
                    np.testing.assert_array_equal(value, host_state[key], err_msg=f"step {step}: {key} changed")
                continue
            output = module(x)
            (x_host,) = to_host(vcombo, x)
            expected = reference(x_host)
            state = module.state_dict()
            values = to_host(vcombo, output, *state.values())
            assert values[0] is not None
            assert max_error(values[0], expected) <= tol, f"step {step}: output"
            for key, value in zip(state, values[1:], strict=True):
                assert value is not None
                if key == "num_batches_tracked":
                    assert int(value) == reference.state[key], f"step {step}: {key}"
                else:
                    assert max_error(value, reference.state[key]) <= tol, f"step {step}: {key}"

    check()
