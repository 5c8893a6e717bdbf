"""Dask stays lazy: no call of ours computes; unknown sizes are a clear error."""

from __future__ import annotations

import numpy as np
import pytest

import portable_bn as pbn
from conftest import require_backend
from portable_bn.testing import reference_batch_norm, sample


@pytest.fixture
def forbid_compute():
    require_backend("dask")
    import dask

    def scheduler(*args, **kwargs):
        raise AssertionError("portable_bn triggered a Dask compute")

    with dask.config.set(scheduler=scheduler):
        yield


def test_nothing_computes(forbid_compute):
    import dask.array as da

    x = da.from_array(sample((6, 3, 4), seed=0), chunks=(2, 3, 4))
    result = pbn.batch_norm(x, da.zeros(3), da.ones(3), da.ones(3), da.zeros(3), training=True)
    grads = pbn.batch_norm_backward(x, x, None, result.mean, result.invstd)
    module = pbn.BatchNorm1d(3, momentum=None)
    outputs = [module(x), module(x), module.eval()(x)]
    assert all(isinstance(a, da.Array) for a in [*result, *grads, *outputs])
    assert isinstance(module.num_batches_tracked, da.Array)


def test_lazy_results_are_right():
    require_backend("dask")
    import dask.array as da

    host = sample((6, 3, 4), seed=1)
    result = pbn.batch_norm(da.from_array(host, chunks=(4, 3, 2)), da.zeros(3), da.ones(3), training=True)
    expected = reference_batch_norm(host, np.zeros(3), np.ones(3), training=True)
    np.testing.assert_allclose(result.output.compute(), expected["output"], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(result.running_var.compute(), expected["running_var"], rtol=1e-13)


def test_unknown_chunk_sizes_are_a_clear_error(forbid_compute):
    import dask.array as da

    x = da.from_array(sample((6, 3), seed=2), chunks=(2, 3))
    filtered = x[x[:, 0] > -100.0]  # rows kept unknown until computed
    with pytest.raises(ValueError, match=r"x has unknown size along axis \[0\].*compute_chunk_sizes"):
        pbn.batch_norm(filtered, training=True)
    module = pbn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        module(filtered)
    assert module.xp is None
