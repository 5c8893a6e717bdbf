"""Accuracy yardstick, in one place, for the test suite and the check command.

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
    """Largest normwise error accepted for an input of ``dtype_name``."""
    return COMPUTE_ULPS * _EPS[_COMPUTE[dtype_name]] + _EPS[dtype_name]


def max_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Normwise error; NaN where one has NaN and the other not counts as infinite."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {actual.shape} != expected {expected.shape}")
    if actual.size == 0:
        return 0.0
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    if np.any(nan_a != nan_e):
        return float("inf")
    finite = ~nan_e
    if not np.any(finite):
        return 0.0
    diff = np.abs(actual[finite] - expected[finite])
    scale = max(1.0, float(np.max(np.abs(expected[finite]))))
    return float(np.max(diff)) / scale
