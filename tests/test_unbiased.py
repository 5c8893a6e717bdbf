"""``unbiased=False``: the running variance takes the biased batch variance (Keras, Flax and
ONNX keep that one), on every backend, in the functions, the modules and the masked path."""

from __future__ import annotations

import numpy as np
import pytest

import portable_bn as pbn
from portable_bn.testing import dtype_error, failures, functional_scenario, sample, tolerance


@pytest.mark.parametrize("shape", [(6, 3, 5), (4, 3, 2, 3)], ids=["NCL", "NCHW"])
@pytest.mark.parametrize("momentum", [0.1, 1.0])
def test_biased_running_variance_matches_the_reference(vcombo, shape, momentum):
    checks = list(functional_scenario(vcombo, shape, training=True, momentum=momentum, unbiased=False))
    assert not failures(checks), failures(checks)
    # and the default is PyTorch's: the two differ by n / (n - 1)
    unbiased = pbn.batch_norm(
        vcombo.asarray(sample(shape, seed=0)),
        vcombo.asarray(np.zeros(3), vcombo.param_dtype),
        vcombo.asarray(np.ones(3), vcombo.param_dtype),
        training=True,
    )
    biased = pbn.batch_norm(
        vcombo.asarray(sample(shape, seed=0)),
        vcombo.asarray(np.zeros(3), vcombo.param_dtype),
        vcombo.asarray(np.ones(3), vcombo.param_dtype),
        training=True,
        unbiased=False,
    )
    n = int(np.prod(shape)) // 3
    got = vcombo.to_numpy(biased.running_var) - 0.9
    want = (vcombo.to_numpy(unbiased.running_var) - 0.9) * (n - 1) / n
    assert dtype_error(got, want, vcombo.param_dtype_name) <= 4 * tolerance(vcombo.param_dtype_name)


def test_module_with_momentum_none_averages_biased_variances(vcombo):
    combo = vcombo
    bn = pbn.BatchNorm1d(
        2, momentum=None, unbiased=False, xp=combo.library, device=combo.device, dtype=combo.param_dtype
    )
    assert bn.unbiased is False and pbn.BatchNorm1d(2).unbiased is True
    batches = [sample((5, 2, 3), seed=seed) for seed in range(3)]
    for batch in batches:
        bn(combo.asarray(batch))
    used = [combo.to_numpy(combo.asarray(batch)) for batch in batches]
    want_var = np.mean([batch.transpose(1, 0, 2).reshape(2, -1).var(axis=1) for batch in used], axis=0)
    want_mean = np.mean([batch.mean(axis=(0, 2)) for batch in used], axis=0)
    for name, want in (("running_var", want_var), ("running_mean", want_mean)):
        got = combo.to_numpy(getattr(bn, name))
        assert dtype_error(got, want, combo.param_dtype_name) <= tolerance(combo.param_dtype_name), name
    bn.eval()
    bn.train()
    assert bn.unbiased is False


def test_one_valid_value_updates_a_biased_running_variance():
    """A single value has a biased variance (0) but no unbiased one."""
    x = np.array([[[1.0, 5.0]], [[3.0, 7.0]]])
    one = np.array([[True, False], [False, False]])
    biased = pbn.batch_norm(x, np.zeros(1), np.ones(1), training=True, mask=one, unbiased=False)
    unbiased = pbn.batch_norm(x, np.zeros(1), np.ones(1), training=True, mask=one)
    np.testing.assert_allclose(biased.running_mean, [0.1])
    np.testing.assert_allclose(biased.running_var, [0.9])
    np.testing.assert_array_equal(unbiased.running_var, [1.0])


def test_unbiased_must_be_a_bool():
    with pytest.raises(TypeError, match="unbiased must be True or False, got int"):
        pbn.batch_norm(np.ones((3, 2)), training=True, unbiased=0)
    with pytest.raises(TypeError, match="unbiased must be True or False"):
        pbn.BatchNorm1d(2, unbiased="no")
