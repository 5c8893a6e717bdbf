"""Conformance tools: the float64 reference, the accuracy yardstick, the backend table and the
scenarios that the test suite and ``python -m portable_bn check`` run.

Like :mod:`numpy.testing`, this is what a user runs to prove an array library conforms:
describe it as a :class:`Combination` (with a ``maker`` that turns NumPy data into its arrays)
and call :func:`check_combination`. :func:`pure_primitives` runs portable_bn on the pure
array-API primitives alone, for comparing a backend's accelerated primitives with them.

Examples
--------
>>> import numpy as np
>>> import portable_bn as pbn
>>> from portable_bn.testing import max_error, reference_batch_norm, tolerance
>>> x = np.random.default_rng(0).normal(5.0, 2.0, size=(8, 3, 4, 4)).astype(np.float32)
>>> expected = reference_batch_norm(x, training=True)
>>> max_error(pbn.batch_norm(x, training=True).output, expected["output"]) <= tolerance("float32")
True
"""

from .._dispatch import pure_primitives
from ._matrix import (
    ALL_BACKENDS,
    CPU_BACKENDS,
    GPU_BACKENDS,
    BackendUnavailable,
    Combination,
    combinations,
)
from ._reference import ReferenceModule, reference_backward, reference_batch_norm, reference_moments
from ._scenarios import (
    HARD_DATA,
    LARGE_SHAPES,
    MODULE_SHAPES,
    Check,
    check_combination,
    failures,
    functional_scenario,
    hard_data,
    hard_data_scenario,
    module_scenario,
    sample,
    scenarios,
)
from ._tolerance import COMPUTE_ULPS, dtype_error, max_error, relative_error, tolerance

__all__ = [
    "ALL_BACKENDS",
    "COMPUTE_ULPS",
    "CPU_BACKENDS",
    "GPU_BACKENDS",
    "HARD_DATA",
    "LARGE_SHAPES",
    "MODULE_SHAPES",
    "BackendUnavailable",
    "Check",
    "Combination",
    "ReferenceModule",
    "check_combination",
    "combinations",
    "dtype_error",
    "failures",
    "functional_scenario",
    "hard_data",
    "hard_data_scenario",
    "max_error",
    "module_scenario",
    "pure_primitives",
    "reference_backward",
    "reference_batch_norm",
    "reference_moments",
    "relative_error",
    "sample",
    "scenarios",
    "tolerance",
]
