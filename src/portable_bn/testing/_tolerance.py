"""The accuracy yardstick, in one place, for the test suite and the ``check`` command.

Error is measured normwise against the float64 reference:
``max|actual - expected| / max(1, max|expected|)``. The allowed error is
derived from the dtypes: a multiple of the compute dtype's machine epsilon
(rounding in the sums, the square root and the update) plus one epsilon of
the output dtype (the final rounding of a float16/bfloat16 result).
"""

from __future__ import annotations

import numpy as np

# float16/bfloat16 compute in float32 (see _agnostic.compute_dtype).
_EPS = {
    "float64": float(np.finfo(np.float64).eps),
    "float32": float(np.finfo(np.float32).eps),
    "float16": float(np.finfo(np.float16).eps),
    "bfloat16": 2.0**-7,
}
_COMPUTE = {"float64": "float64", "float32": "float32", "float16": "float32", "bfloat16": "float32"}
COMPUTE_ULPS = 64
"""Rounding budget of the compute dtype, in units of its epsilon."""


def tolerance(dtype_name: str) -> float:
    """Largest error accepted for a value of dtype ``dtype_name``.

    ``COMPUTE_ULPS`` units of the compute dtype's precision (float32 for float16/bfloat16)
    plus one unit of the dtype's own (the final rounding).

    Parameters
    ----------
    dtype_name : str
        ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``.

    Returns
    -------
    float
        The tolerance.

    Examples
    --------
    >>> from portable_bn.testing import tolerance
    >>> tolerance("float64") == 64 * 2.0**-52 + 2.0**-52
    True
    """
    return COMPUTE_ULPS * _EPS[_COMPUTE[dtype_name]] + _EPS[dtype_name]


def max_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Normwise error ``max|actual - expected| / max(1, max|expected|)``.

    NaN where one has NaN and the other not counts as infinite, and so does Inf against a
    different value.

    Parameters
    ----------
    actual, expected : array_like
        Values of the same shape.

    Returns
    -------
    float
        The error (0 for empty arrays).

    Examples
    --------
    >>> from portable_bn.testing import max_error
    >>> max_error([1.0, 2.5], [1.0, 2.0]), max_error([0.001], [0.0])
    (0.25, 0.001)
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {actual.shape} != expected {expected.shape}")
    if actual.size == 0:
        return 0.0
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    if np.any(nan_a != nan_e):
        return float("inf")
    infinite = np.isinf(expected) | np.isinf(actual)
    if np.any(actual[infinite] != expected[infinite]):
        return float("inf")
    finite = ~nan_e & ~infinite
    if not np.any(finite):
        return 0.0
    diff = np.abs(actual[finite] - expected[finite])
    scale = max(1.0, float(np.max(np.abs(expected[finite]))))
    return float(np.max(diff)) / scale


def dtype_error(actual: np.ndarray, expected: np.ndarray, dtype_name: str) -> float:
    """:func:`max_error`, where values beyond the dtype's range must be that infinity.

    Where ``expected`` (float64) rounded to ``dtype_name`` overflows (a running variance beyond
    float32's range, say), ``actual`` must hold the same infinity; elsewhere the float64 values
    are the yardstick.

    Parameters
    ----------
    actual, expected : array_like
        Values of the same shape; ``expected`` in float64.
    dtype_name : str
        The dtype ``actual`` was computed in.

    Returns
    -------
    float
        The error.

    Examples
    --------
    >>> from portable_bn.testing import dtype_error
    >>> dtype_error([float("inf"), 1.0], [1e39, 1.0], "float32")
    0.0
    """
    expected = np.asarray(expected, dtype=np.float64)
    host_name = "float32" if dtype_name == "bfloat16" else dtype_name  # the same largest value
    with np.errstate(over="ignore"):
        rounded = expected.astype(host_name).astype(np.float64)
    beyond = np.isinf(rounded) & np.isfinite(expected)
    expected = np.where(beyond, rounded, expected)
    return max_error(actual, expected)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest ``|actual - expected| / |expected|`` over the entries.

    The yardstick for per-channel statistics, which are not compared normwise: absolute where
    ``expected`` is 0; NaN against non-NaN and Inf against another value count as infinite.

    Parameters
    ----------
    actual, expected : array_like
        Values of the same shape.

    Returns
    -------
    float
        The error.

    Examples
    --------
    >>> from portable_bn.testing import relative_error
    >>> relative_error([316.0, 2.0], [316.2278, 2.0]) < 1e-3
    True
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {actual.shape} != expected {expected.shape}")
    if np.any(np.isnan(actual) != np.isnan(expected)):
        return float("inf")
    infinite = np.isinf(expected) | np.isinf(actual)
    if np.any(actual[infinite] != expected[infinite]):
        return float("inf")
    finite = np.isfinite(expected) & np.isfinite(actual)
    if not np.any(finite):
        return 0.0
    size = np.where(expected[finite] == 0.0, 1.0, np.abs(expected[finite]))
    return float(np.max(np.abs(actual[finite] - expected[finite]) / size))
