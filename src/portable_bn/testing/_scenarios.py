"""Conformance scenarios: calls of portable_bn against the float64 reference, as (what, error) pairs.

``python -m portable_bn check`` and the test suite run the same scenarios, so the command
and CI prove the same thing; a library added to the backend table runs them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np

from .._functional import batch_norm, batch_norm_backward
from .._modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ._matrix import Combination
from ._reference import ReferenceModule, reference_backward, reference_batch_norm
from ._tolerance import dtype_error, max_error, relative_error, tolerance


class Check(NamedTuple):
    """One comparison of a scenario: what was compared, its error and the largest error allowed.

    The limit is the tolerance of the compared value's dtype: float32 for the statistics,
    parameters and running statistics of float16/bfloat16 input.

    Parameters
    ----------
    what : str
        The value compared (``"output"``, ``"step 2 running_var"``, ...).
    error : float
        Its error against the float64 reference.
    limit : float
        The largest error allowed.

    Examples
    --------
    >>> from portable_bn.testing import Check
    >>> Check("output", 1e-7, 7.7e-6).passed
    True
    """

    what: str
    error: float
    limit: float

    @property
    def passed(self) -> bool:
        """Whether the error is within the limit (NaN is not)."""
        return self.error <= self.limit


def failures(checks: Iterable[Check]) -> list[Check]:
    """The checks whose error exceeds their limit (NaN counts as exceeding).

    Parameters
    ----------
    checks : iterable of Check
        The checks of one or more scenarios.

    Returns
    -------
    list of Check
        Those that did not pass, in order.

    Examples
    --------
    >>> from portable_bn.testing import Check, failures
    >>> failures([Check("output", 1e-7, 1e-6), Check("mean", 1e-3, 1e-6)])
    [Check(what='mean', error=0.001, limit=1e-06)]
    """
    return [check for check in checks if not check.passed]


MODULE_SHAPES: dict[str, tuple[type, tuple[int, ...]]] = {
    "1d-2D": (BatchNorm1d, (6, 4)),
    "1d-3D": (BatchNorm1d, (4, 3, 5)),
    "2d": (BatchNorm2d, (3, 4, 3, 5)),
    "3d": (BatchNorm3d, (2, 3, 2, 3, 4)),
}
"""Module kind -> (class, input shape) of :func:`module_scenario`."""

LARGE_SHAPES = ((8, 64, 32, 32), (64, 48, 7, 7))
"""Inputs large enough for every accelerated primitive: several cache tiles and channel groups
of NumPy's, long and short rows, and PyTorch's native eval (from 65536 elements)."""


def sample(shape: tuple[int, ...], *, seed: int, axis: int = 1) -> np.ndarray:
    """Float64 data with a different offset and spread per channel.

    A channel mix-up or a wrong reduction axis cannot pass a comparison on these data.

    Parameters
    ----------
    shape : tuple of int
        The shape.
    seed : int, keyword-only
        Seed of the random generator.
    axis : int, keyword-only
        The channel axis.

    Returns
    -------
    ndarray
        The data.

    Examples
    --------
    >>> from portable_bn.testing import sample
    >>> sample((4, 3), seed=0).shape
    (4, 3)
    """
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    param_shape = [1] * len(shape)
    param_shape[axis] = channels
    offset = np.linspace(-3.0, 5.0, channels).reshape(param_shape)
    spread = np.linspace(0.5, 3.0, channels).reshape(param_shape)
    result: np.ndarray = offset + spread * rng.standard_normal(shape)
    return result


def _normal(offset: float, spread: float) -> Callable[[tuple[int, ...], int], np.ndarray]:
    def make(shape: tuple[int, ...], seed: int) -> np.ndarray:
        data = offset + spread * np.random.default_rng(seed).normal(size=shape)
        return np.clip(data, -3.4e38, 3.4e38)  # inside float32's range

    return make


def _constant(value: float, channel: int) -> Callable[[tuple[int, ...], int], np.ndarray]:
    def make(shape: tuple[int, ...], seed: int) -> np.ndarray:
        data = np.random.default_rng(seed).normal(size=shape)
        data[:, channel] = value
        return data

    return make


_ALL = ("float16", "bfloat16", "float32", "float64")
_FULL = ("float32", "float64")
HARD_DATA: dict[str, tuple[Callable[[tuple[int, ...], int], np.ndarray], tuple[str, ...]]] = {
    "N(0,1)": (_normal(0.0, 1.0), _ALL),
    "300+100N": (_normal(300.0, 100.0), _ALL),
    "constant ch.": (_constant(123.4375, 1), _ALL),
    "1+1e-4N": (_normal(1.0, 1e-4), _FULL),
    "1e4+0.1N": (_normal(1e4, 0.1), _FULL),
    "1e6+N": (_normal(1e6, 1.0), _FULL),
    "1e20 N": (_normal(0.0, 1e20), _FULL),
    "1e20+1e19N": (_normal(1e20, 1e19), _FULL),
    "3e37 N": (_normal(0.0, 3e37), _FULL),
    "-3e38+1e37N": (_normal(-3e38, 1e37), _FULL),
    "constant 4e16": (_constant(4e16, 0), _FULL),
    "constant 3e30": (_constant(3e30, 0), _FULL),
    "constant 3e38": (_constant(3e38, 0), _FULL),
    "constant 1e300": (_constant(1e300, 0), ("float64",)),
}
"""Data sets that break naive implementations: name -> (``make(shape, seed)``, the dtypes that
hold them). Large offsets, magnitudes whose squares overflow float32, values near float32's
largest, tiny variances, constant channels (also of huge values, where ``eps`` times the
square of the prescale underflows)."""


def hard_data(name: str, shape: tuple[int, ...] = (8, 3, 4, 4), *, seed: int = 0) -> np.ndarray:
    """Float64 values of the data set ``name`` of :data:`HARD_DATA` (channel axis 1).

    Parameters
    ----------
    name : str
        A key of :data:`HARD_DATA`.
    shape : tuple of int
        The shape (at least two channels; some sets make channel 0 or 1 constant).
    seed : int, keyword-only
        Seed of the random generator.

    Returns
    -------
    ndarray
        The data.

    Examples
    --------
    >>> from portable_bn.testing import hard_data
    >>> float(hard_data("constant 4e16")[:, 0].min())
    4e+16
    """
    return HARD_DATA[name][0](shape, seed)


def module_scenario(
    combo: Combination,
    kind: str,
    *,
    affine: bool = True,
    track_running_stats: bool = True,
    momentum: float | None = 0.1,
    axis: int = 1,
    steps: tuple[bool, ...] = (True, True, False, True, False),
    seed: int = 0,
) -> Iterator[Check]:
    """Drive a module of ours and :class:`ReferenceModule` through the same calls.

    Parameters
    ----------
    combo : Combination
        The library, device and dtype.
    kind : str
        A key of :data:`MODULE_SHAPES`: ``"1d-2D"``, ``"1d-3D"``, ``"2d"`` or ``"3d"``.
    affine, track_running_stats, momentum : keyword-only
        As for the modules.
    axis : int, keyword-only
        The channel axis.
    steps : tuple of bool, keyword-only
        The calls: True for a training call, False for an eval call.
    seed : int, keyword-only
        Seed of the data.

    Yields
    ------
    Check
        The output and every piece of state after each step (normwise errors).

    Examples
    --------
    >>> import numpy as np
    >>> from portable_bn.testing import Combination, module_scenario, tolerance
    >>> combo = Combination("numpy", np, "cpu", "float32", values=True)
    >>> all(check.passed for check in module_scenario(combo, "2d"))
    True
    """
    cls, shape = MODULE_SHAPES[kind]
    if axis != 1:
        shape = tuple(np.moveaxis(np.empty(shape), 1, axis).shape)
    channels = shape[axis]
    module = cls(
        channels,
        momentum=momentum,
        affine=affine,
        track_running_stats=track_running_stats,
        axis=axis,
        xp=combo.library,
        device=combo.device,
        dtype=combo.param_dtype,
    )
    reference = ReferenceModule(
        channels, momentum=momentum, affine=affine, track_running_stats=track_running_stats, axis=axis
    )
    if affine:  # non-trivial affine parameters, same in both
        rng = np.random.default_rng(seed + 100)
        weight, bias = rng.uniform(0.5, 2.0, channels), rng.normal(0.0, 1.0, channels)
        module.load_state_dict({"weight": weight, "bias": bias}, strict=False)
        reference.state.update(weight=combo.to_numpy(module.weight), bias=combo.to_numpy(module.bias))
    output_limit, state_limit = tolerance(combo.dtype_name), tolerance(combo.param_dtype_name)
    for step, training in enumerate(steps):
        module.train(training)
        reference.training = training
        x = combo.asarray(sample(shape, seed=seed + step, axis=axis))
        out = module(x)
        expected = reference(combo.to_numpy(x))
        yield Check(f"step {step} output", max_error(combo.to_numpy(out), expected), output_limit)
        for key, value in module.state_dict().items():
            if key == "num_batches_tracked":
                same = int(combo.to_numpy(value)) == reference.state[key]
                yield Check(f"step {step} {key}", 0.0 if same else float("inf"), 0.0)
            else:
                error = max_error(combo.to_numpy(value), reference.state[key])
                yield Check(f"step {step} {key}", error, state_limit)


def functional_scenario(
    combo: Combination,
    shape: tuple[int, ...],
    *,
    training: bool,
    axis: int = 1,
    affine: bool = True,
    running: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    seed: int = 0,
    data: np.ndarray | None = None,
    unbiased: bool = True,
) -> Iterator[Check]:
    """One :func:`~portable_bn.batch_norm` call and its backward against the reference.

    Values the reference gives beyond the dtype's range (a running variance, say) must be that
    infinity. The reference backward takes the true ``invstd`` and the returned ``mean``: a
    mean rounded to the dtype moves the true gradient by ``|mean| / std`` of its roundings, a
    property of the rounded statistic that the forward's comparison covers.

    Parameters
    ----------
    combo : Combination
        The library, device and dtype.
    shape : tuple of int
        The input's shape.
    training : bool, keyword-only
        Batch statistics (and the running update) or running statistics.
    axis : int, keyword-only
        The channel axis.
    affine, running : bool, keyword-only
        Whether weight and bias, and running statistics, are given.
    momentum, eps : float, keyword-only
        As for :func:`~portable_bn.batch_norm`.
    seed : int, keyword-only
        Seed of the data and the parameters.
    data : ndarray, optional, keyword-only
        Float64 values of ``shape`` to use instead of :func:`sample`'s.
    unbiased : bool, keyword-only
        As for :func:`~portable_bn.batch_norm`.

    Yields
    ------
    Check
        The output, the running statistics, ``mean`` (normwise), ``invstd`` (relative, per
        channel) and the three gradients.

    Examples
    --------
    >>> import numpy as np
    >>> from portable_bn.testing import Combination, functional_scenario
    >>> combo = Combination("numpy", np, "cpu", "float64", values=True)
    >>> checks = list(functional_scenario(combo, (4, 3, 5), training=True))
    >>> sorted(check.what for check in checks)
    ['grad_bias', 'grad_input', 'grad_weight', 'invstd', 'mean', 'output', 'running_mean', 'running_var']
    >>> max(check.error for check in checks) < 1e-14
    True
    """
    channels = shape[axis]
    rng = np.random.default_rng(seed + 1)
    x_host = sample(shape, seed=seed, axis=axis) if data is None else data
    args = {
        "running_mean": rng.normal(0.0, 1.0, channels) if running else None,
        "running_var": rng.uniform(0.5, 2.0, channels) if running else None,
        "weight": rng.uniform(0.5, 2.0, channels) if affine else None,
        "bias": rng.normal(0.0, 1.0, channels) if affine else None,
    }
    arrays: dict[str, Any] = {k: None if v is None else combo.asarray(v, combo.param_dtype) for k, v in args.items()}
    x = combo.asarray(x_host)
    result = batch_norm(x, **arrays, training=training, momentum=momentum, eps=eps, axis=axis, unbiased=unbiased)
    host = {k: None if v is None else combo.to_numpy(v) for k, v in arrays.items()}
    expected = reference_batch_norm(
        combo.to_numpy(x), **host, training=training, momentum=momentum, eps=eps, axis=axis, unbiased=unbiased
    )
    for key in ("output", "running_mean", "running_var", "mean", "invstd"):
        value, want = getattr(result, key), expected[key]
        dtype_name = combo.dtype_name if key == "output" else combo.param_dtype_name
        if want is None:
            yield Check(key, 0.0 if value is None else float("inf"), 0.0)
        elif key == "invstd":
            yield Check(key, relative_error(combo.to_numpy(value), want), tolerance(dtype_name))
        else:
            yield Check(key, dtype_error(combo.to_numpy(value), want, dtype_name), tolerance(dtype_name))
    grad = combo.asarray(np.random.default_rng(seed + 2).normal(0.0, 1.0, shape))
    grads = batch_norm_backward(grad, x, arrays["weight"], result.mean, result.invstd, training=training, axis=axis)
    want_grads = reference_backward(
        combo.to_numpy(grad),
        combo.to_numpy(x),
        host["weight"],
        combo.to_numpy(result.mean),
        expected["invstd"],
        training=training,
        axis=axis,
    )
    for name, value, want in zip(("grad_input", "grad_weight", "grad_bias"), grads, want_grads, strict=True):
        dtype_name = combo.dtype_name if name == "grad_input" else combo.param_dtype_name
        yield Check(name, dtype_error(combo.to_numpy(value), want, dtype_name), tolerance(dtype_name))


def hard_data_scenario(combo: Combination, name: str, *, shape: tuple[int, ...] = (8, 3, 4, 4)) -> Iterator[Check]:
    """:func:`functional_scenario` in training on a data set of :data:`HARD_DATA`.

    Parameters
    ----------
    combo : Combination
        The library, device and dtype.
    name : str
        A key of :data:`HARD_DATA`.
    shape : tuple of int, keyword-only
        The input's shape.

    Yields
    ------
    Check
        As :func:`functional_scenario`, named ``"<data set>: <value>"``; nothing for a dtype
        that cannot hold the data.

    Examples
    --------
    >>> import numpy as np
    >>> from portable_bn.testing import Combination, hard_data_scenario
    >>> combo = Combination("numpy", np, "cpu", "float32", values=True)
    >>> [check.passed for check in hard_data_scenario(combo, "constant 4e16") if check.what.endswith("invstd")]
    [True]
    """
    make, dtypes = HARD_DATA[name]
    if combo.dtype_name not in dtypes:
        return
    checks = functional_scenario(combo, shape, training=True, momentum=0.25, data=make(shape, 7))
    yield from (check._replace(what=f"{name}: {check.what}") for check in checks)


def scenarios(combo: Combination) -> Iterator[Check]:
    """Every scenario for one combination.

    The modules (each kind, both momenta, without affine and running statistics, channels
    last), the functions in training and eval on small and :data:`LARGE_SHAPES` inputs, and
    every data set of :data:`HARD_DATA`.

    Parameters
    ----------
    combo : Combination
        The library, device and dtype.

    Yields
    ------
    Check
        Every comparison.

    Examples
    --------
    >>> import numpy as np
    >>> from portable_bn.testing import Combination, failures, scenarios
    >>> failures(scenarios(Combination("numpy", np, "cpu", "float64", values=True)))
    []
    """
    for kind in MODULE_SHAPES:
        for momentum in (0.1, None):
            yield from module_scenario(combo, kind, momentum=momentum)
    yield from module_scenario(combo, "2d", affine=False, track_running_stats=False)
    yield from module_scenario(combo, "2d", axis=-1)
    for training in (True, False):
        yield from functional_scenario(combo, (4, 3, 5, 2), training=training, axis=-1)
        yield from functional_scenario(combo, (6, 3, 5), training=training, eps=0.5)
        for shape in LARGE_SHAPES:
            large = functional_scenario(combo, shape, training=training)
            yield from (check._replace(what=f"{shape} {check.what}") for check in large)
    for name in HARD_DATA:
        yield from hard_data_scenario(combo, name)


def check_combination(combo: Combination) -> None:
    """Run :func:`scenarios` on ``combo``, and fail if a check fails.

    The ``numpy.testing``-style entry point for a library added to the table.

    Parameters
    ----------
    combo : Combination
        The library, device and dtype.

    Raises
    ------
    AssertionError
        Naming every check whose error exceeds its limit.

    Examples
    --------
    >>> import numpy as np
    >>> from portable_bn.testing import Combination, check_combination
    >>> check_combination(Combination("numpy", np, "cpu", "float32", values=True))
    """
    failed = failures(scenarios(combo))
    if failed:
        listed = "; ".join(f"{c.what}: {c.error:.3g} > {c.limit:.3g}" for c in failed[:20])
        raise AssertionError(f"{combo.id}: {len(failed)} checks failed: {listed}")
