"""Masked and ghost batch norm on every (backend, device, dtype) against the NumPy float64
reference: masked equals batch norm of the valid values alone, ghost equals batch norm of
each virtual batch in turn -- forward, running statistics and backward."""

from __future__ import annotations

import numpy as np
import pytest

import portable_bn as pbn
from conftest import require_backend
from portable_bn.testing import (
    Check,
    dtype_error,
    failures,
    reference_backward,
    reference_batch_norm,
    relative_error,
    sample,
    tolerance,
)


def as_mask(combo, mask):
    """A boolean array of the combination's library and device."""
    if combo.backend in ("dask", "cupy"):
        return combo.asarray(mask, np.dtype(bool))
    return combo.asarray(mask, combo.library.bool)


def parameters(combo, channels, seed=1):
    rng = np.random.default_rng(seed)
    host = {
        "running_mean": rng.normal(0.0, 1.0, channels),
        "running_var": rng.uniform(0.5, 2.0, channels),
        "weight": rng.uniform(0.5, 2.0, channels),
        "bias": rng.normal(0.0, 1.0, channels),
    }
    return host, {key: combo.asarray(value, combo.param_dtype) for key, value in host.items()}


def channels_last(array, axis):
    return np.moveaxis(np.asarray(array, dtype=np.float64), axis, -1)


def check(combo, what, value, want, *, per_channel=True, relative=False):
    dtype_name = combo.param_dtype_name if per_channel else combo.dtype_name
    got = combo.to_numpy(value)
    error = relative_error(got, want) if relative else dtype_error(got, want, dtype_name)
    return Check(what, error, tolerance(dtype_name))


def assert_checks(checks):
    checks = list(checks)
    bad = failures(checks)
    assert not bad, f"checks beyond their limits: {bad}"


def masked_reference(x, mask, grad, host, *, axis, momentum=0.1):
    """Batch norm of the valid values alone (reference), applied at every position; the
    backward of the valid values, 0 elsewhere."""
    x_last, g_last = channels_last(x, axis), channels_last(grad, axis)
    valid, valid_grad = x_last[mask], g_last[mask]
    expected = reference_batch_norm(
        valid,
        host["running_mean"],
        host["running_var"],
        host["weight"],
        host["bias"],
        training=True,
        momentum=momentum,
        axis=1,
    )
    mean, invstd = expected["mean"], expected["invstd"]
    output_last = (x_last - mean) * invstd * host["weight"] + host["bias"]
    grad_valid, grad_weight, grad_bias = reference_backward(
        valid_grad, valid, host["weight"], mean, invstd, training=True, axis=1
    )
    grad_last = np.zeros_like(x_last)
    grad_last[mask] = grad_valid
    return {
        **expected,
        "output": np.moveaxis(output_last, -1, axis),
        "grad_input": np.moveaxis(grad_last, -1, axis),
        "grad_weight": grad_weight,
        "grad_bias": grad_bias,
    }


MASKED_CASES = [((6, 3, 5), 1), ((4, 3, 3, 4), 1), ((5, 4, 3), -1)]


@pytest.mark.parametrize(("shape", "axis"), MASKED_CASES, ids=["NCL", "NCHW", "NLC"])
def test_masked_equals_batch_norm_of_the_valid_values(vcombo, shape, axis):
    channels = shape[axis]
    x_host = sample(shape, seed=3, axis=axis)
    mask_shape = tuple(size for i, size in enumerate(shape) if i != axis % len(shape))
    mask_host = np.random.default_rng(4).random(mask_shape) < 0.6
    grad_host = np.random.default_rng(5).normal(0.0, 1.0, shape)
    host, arrays = parameters(combo := vcombo, channels)
    x, mask, grad = combo.asarray(x_host), as_mask(combo, mask_host), combo.asarray(grad_host)
    result = pbn.batch_norm(x, **arrays, training=True, axis=axis, mask=mask)
    grads = pbn.batch_norm_backward(grad, x, arrays["weight"], result.mean, result.invstd, axis=axis, mask=mask)
    want = masked_reference(combo.to_numpy(x), mask_host, combo.to_numpy(grad), host, axis=axis)
    checks = [
        check(combo, "output", result.output, want["output"], per_channel=False),
        check(combo, "mean", result.mean, want["mean"]),
        check(combo, "invstd", result.invstd, want["invstd"], relative=True),
        check(combo, "running_mean", result.running_mean, want["running_mean"]),
        check(combo, "running_var", result.running_var, want["running_var"]),
        check(combo, "grad_input", grads[0], want["grad_input"], per_channel=False),
        check(combo, "grad_weight", grads[1], want["grad_weight"]),
        check(combo, "grad_bias", grads[2], want["grad_bias"]),
    ]
    assert_checks(checks)
    masked_out = channels_last(combo.to_numpy(grads[0]), axis)[~mask_host]
    assert np.all(masked_out == 0.0)


def test_masked_module_and_its_backward(vcombo):
    combo = vcombo
    shape = (5, 3, 4)
    x_host = sample(shape, seed=7)
    mask_host = np.random.default_rng(8).random((5, 4)) < 0.5
    mask_host[0, 0] = mask_host[1, 1] = True  # at least two valid values
    grad_host = np.random.default_rng(9).normal(size=shape)
    bn = pbn.BatchNorm1d(3, momentum=None, xp=combo.library, device=combo.device, dtype=combo.param_dtype)
    x, mask = combo.asarray(x_host), as_mask(combo, mask_host)
    output = bn(x, mask=mask)
    grad_input = bn.backward(combo.asarray(grad_host))
    host = {"running_mean": np.zeros(3), "running_var": np.ones(3), "weight": np.ones(3), "bias": np.zeros(3)}
    want = masked_reference(
        combo.to_numpy(x), mask_host, combo.to_numpy(combo.asarray(grad_host)), host, axis=1, momentum=1.0
    )
    assert_checks(
        [
            check(combo, "output", output, want["output"], per_channel=False),
            check(combo, "running_mean", bn.running_mean, want["running_mean"]),
            check(combo, "running_var", bn.running_var, want["running_var"]),
            check(combo, "grad_input", grad_input, want["grad_input"], per_channel=False),
            check(combo, "weight_grad", bn.weight_grad, want["grad_weight"]),
            check(combo, "bias_grad", bn.bias_grad, want["grad_bias"]),
        ]
    )
    assert int(combo.to_numpy(bn.num_batches_tracked)) == 1
    # eval: the mask changes nothing
    bn.eval()
    assert np.array_equal(combo.to_numpy(bn(x, mask=mask)), combo.to_numpy(bn(x)))


@pytest.mark.parametrize("valid", [0, 1], ids=["no-valid-value", "one-valid-value"])
def test_too_few_valid_values_keep_the_running_statistics(vcombo, valid):
    """PyTorch's rule for an empty batch: statistics unchanged, the counter still counts. One
    valid value has no unbiased variance: the same. No exception (the count is data)."""
    combo = vcombo
    x_host = sample((4, 2, 3), seed=11)
    mask_host = np.zeros((4, 3), dtype=bool)
    mask_host[2, 1] = valid == 1
    bn = pbn.BatchNorm1d(2, xp=combo.library, device=combo.device, dtype=combo.param_dtype)
    bn.running_mean, bn.running_var = (
        combo.asarray([0.5, -1.0], combo.param_dtype),
        combo.asarray([2.0, 3.0], combo.param_dtype),
    )
    x = combo.asarray(x_host)
    output = combo.to_numpy(bn(x, mask=as_mask(combo, mask_host)))
    assert np.array_equal(combo.to_numpy(bn.running_mean), [0.5, -1.0])
    assert np.array_equal(combo.to_numpy(bn.running_var), [2.0, 3.0])
    assert int(combo.to_numpy(bn.num_batches_tracked)) == 1
    assert np.all(np.isfinite(output))
    x_used = combo.to_numpy(x)
    # no valid value: mean 0 and variance 0; one: its mean is itself and its variance 0
    mean = np.zeros((1, 2, 1)) if valid == 0 else x_used[2, :, 1][None, :, None]
    expected = (x_used - mean) / np.sqrt(1e-5)
    assert dtype_error(output, expected, combo.dtype_name) <= tolerance(combo.dtype_name)


def ghost_reference(x, grad, host, size, *, axis=1):
    """Each virtual batch in turn through the reference: outputs, statistics and gradients."""
    running_mean, running_var = host["running_mean"], host["running_var"]
    outputs, means, invstds, grads = [], [], [], []
    grad_weight = grad_bias = 0.0
    for start in range(0, x.shape[0], size):
        part, part_grad = x[start : start + size], grad[start : start + size]
        expected = reference_batch_norm(
            part, running_mean, running_var, host["weight"], host["bias"], training=True, axis=axis
        )
        running_mean, running_var = expected["running_mean"], expected["running_var"]
        outputs.append(expected["output"])
        means.append(expected["mean"])
        invstds.append(expected["invstd"])
        gi, gw, gb = reference_backward(
            part_grad, part, host["weight"], expected["mean"], expected["invstd"], training=True, axis=axis
        )
        grads.append(gi)
        grad_weight, grad_bias = grad_weight + gw, grad_bias + gb
    return {
        "output": np.concatenate(outputs),
        "running_mean": running_mean,
        "running_var": running_var,
        "mean": np.stack(means),
        "invstd": np.stack(invstds),
        "grad_input": np.concatenate(grads),
        "grad_weight": grad_weight,
        "grad_bias": grad_bias,
    }


@pytest.mark.parametrize(("batch", "size"), [(8, 4), (7, 3), (6, 6)], ids=["even", "remainder", "one-group"])
@pytest.mark.parametrize("axis", [1, -1], ids=["NCL", "NLC"])
def test_ghost_equals_each_virtual_batch_in_turn(vcombo, batch, size, axis):
    combo = vcombo
    shape = (batch, 3, 4) if axis == 1 else (batch, 4, 3)
    x_host = sample(shape, seed=13, axis=axis)
    grad_host = np.random.default_rng(14).normal(size=shape)
    host, arrays = parameters(combo, 3)
    x, grad = combo.asarray(x_host), combo.asarray(grad_host)
    result = pbn.batch_norm(x, **arrays, training=True, axis=axis, virtual_batch_size=size)
    grads = pbn.batch_norm_backward(
        grad, x, arrays["weight"], result.mean, result.invstd, axis=axis, virtual_batch_size=size
    )
    want = ghost_reference(combo.to_numpy(x), combo.to_numpy(grad), host, size, axis=axis)
    groups = -(-batch // size)
    assert tuple(result.mean.shape) == tuple(result.invstd.shape) == (groups, 3)
    assert_checks(
        [
            check(combo, "output", result.output, want["output"], per_channel=False),
            check(combo, "mean", result.mean, want["mean"]),
            check(combo, "invstd", result.invstd, want["invstd"], relative=True),
            check(combo, "running_mean", result.running_mean, want["running_mean"]),
            check(combo, "running_var", result.running_var, want["running_var"]),
            check(combo, "grad_input", grads[0], want["grad_input"], per_channel=False),
            check(combo, "grad_weight", grads[1], want["grad_weight"]),
            check(combo, "grad_bias", grads[2], want["grad_bias"]),
        ]
    )


def test_ghost_module_counts_each_virtual_batch_as_a_batch(vcombo):
    """momentum=None: calls of 2 and 3 virtual batches equal five batches fed one by one; eval
    is unchanged by the virtual batch size."""
    combo = vcombo
    x_host = sample((10, 3, 2), seed=17)
    ghost = pbn.BatchNorm1d(
        3, momentum=None, xp=combo.library, device=combo.device, dtype=combo.param_dtype, virtual_batch_size=2
    )
    plain = pbn.BatchNorm1d(3, momentum=None, xp=combo.library, device=combo.device, dtype=combo.param_dtype)
    ghost(combo.asarray(x_host[:4]))
    ghost(combo.asarray(x_host[4:]))
    outputs = [combo.to_numpy(plain(combo.asarray(x_host[i : i + 2]))) for i in range(0, 10, 2)]
    assert int(combo.to_numpy(ghost.num_batches_tracked)) == 5
    for name in ("running_mean", "running_var"):
        got, want = combo.to_numpy(getattr(ghost, name)), combo.to_numpy(getattr(plain, name))
        assert dtype_error(got, want, combo.param_dtype_name) <= tolerance(combo.param_dtype_name), name
    last = combo.to_numpy(ghost(combo.asarray(x_host[8:])))
    ghost_state = combo.to_numpy(ghost.running_mean)
    assert dtype_error(last, outputs[-1], combo.dtype_name) <= 8 * tolerance(combo.dtype_name)
    assert not np.array_equal(ghost_state, combo.to_numpy(plain.running_mean))  # one more batch
    ghost.eval()
    plain.load_state_dict(ghost.state_dict())
    plain.eval()
    x = combo.asarray(x_host)
    assert np.array_equal(combo.to_numpy(ghost(x)), combo.to_numpy(plain(x)))


def test_masked_and_ghost_results_live_where_the_input_lives(combo):
    """Devices without values too (torch "meta", array-api-strict's second device)."""
    x = combo.asarray(sample((4, 3, 2), seed=19))
    mask = as_mask(combo, np.ones((4, 2), dtype=bool))
    for options in ({"mask": mask}, {"virtual_batch_size": 2}, {"mask": mask, "virtual_batch_size": 2}):
        result = pbn.batch_norm(x, training=True, **options)
        for value in (result.output, result.mean, result.invstd):
            assert type(value) is type(x)
            assert str(pbn._compat.device(value)) == str(pbn._compat.device(x))
        assert tuple(result.output.shape) == tuple(x.shape)


def test_ghost_with_mask_is_each_masked_group(vcombo):
    combo = vcombo
    x_host = sample((6, 2, 3), seed=23)
    mask_host = np.random.default_rng(24).random((6, 3)) < 0.7
    mask_host[:, 0] = True
    host, arrays = parameters(combo, 2)
    x, mask = combo.asarray(x_host), as_mask(combo, mask_host)
    result = pbn.batch_norm(x, **arrays, training=True, mask=mask, virtual_batch_size=3)
    running_mean, running_var = host["running_mean"], host["running_var"]
    for index, start in enumerate((0, 3)):
        part_host = {**host, "running_mean": running_mean, "running_var": running_var}
        part = combo.to_numpy(x)[start : start + 3]
        grad = np.zeros_like(part)
        want = masked_reference(part, mask_host[start : start + 3], grad, part_host, axis=1)
        running_mean, running_var = want["running_mean"], want["running_var"]
        assert_checks(
            [
                check(combo, "output", result.output[start : start + 3, ...], want["output"], per_channel=False),
                check(combo, "mean", result.mean[index, ...], want["mean"]),
            ]
        )
    assert_checks(
        [
            check(combo, "running_mean", result.running_mean, running_mean),
            check(combo, "running_var", result.running_var, running_var),
        ]
    )


def test_torch_autograd_through_a_mask_is_the_analytic_backward():
    """Autograd: masked-out positions get no gradient, and the valid ones the backward of
    batch norm of the valid values."""
    require_backend("torch")
    import torch

    x_host = sample((6, 3, 5), seed=29)
    mask_host = np.random.default_rng(30).random((6, 5)) < 0.6
    grad_host = np.random.default_rng(31).normal(size=x_host.shape)
    x = torch.tensor(x_host, requires_grad=True)
    weight = torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    result = pbn.batch_norm(x, None, None, weight, bias, training=True, mask=torch.tensor(mask_host))
    result.output.backward(torch.tensor(grad_host))
    want = pbn.batch_norm_backward(
        grad_host, x_host, weight.detach().numpy(), result.mean.detach().numpy(),
        result.invstd.detach().numpy(), mask=mask_host,
    )  # fmt: skip
    for got, expected in zip((x.grad, weight.grad, bias.grad), want, strict=True):
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


def test_jax_jit_and_grad_with_mask_and_ghost():
    require_backend("jax")
    import jax
    import jax.numpy as jnp

    x_host = sample((8, 3, 4), seed=37)
    mask_host = np.random.default_rng(38).random((8, 4)) < 0.6
    mask_host[:, 0] = True
    grad_host = np.random.default_rng(39).normal(size=x_host.shape)

    def loss(x, mask):
        output = pbn.batch_norm(x, training=True, mask=mask, virtual_batch_size=4).output
        return jnp.sum(output * grad_host)

    x = jnp.asarray(x_host)
    gradient = jax.jit(jax.grad(loss))(x, jnp.asarray(mask_host))
    forward = pbn.batch_norm(x_host, training=True, mask=mask_host, virtual_batch_size=4)
    want, _, _ = pbn.batch_norm_backward(
        grad_host, x_host, None, forward.mean, forward.invstd, mask=mask_host, virtual_batch_size=4
    )
    np.testing.assert_allclose(np.asarray(gradient), want, rtol=0, atol=1e-12)
    jitted = jax.jit(lambda x, m: pbn.batch_norm(x, training=True, mask=m, virtual_batch_size=4).output)
    np.testing.assert_allclose(np.asarray(jitted(x, jnp.asarray(mask_host))), forward.output, rtol=0, atol=1e-12)


class ThreadReplicas:
    """A reducer whose replicas are threads of this process: what a collective does, so that
    synchronization is checked on every backend without an engine (the engines' own tests are
    in test_distributed.py)."""

    def __init__(self, size):
        import threading

        self.size = size
        self._barrier = threading.Barrier(size, timeout=60)
        self._slots = [None] * size
        self._local = threading.local()

    def run(self, work):
        """``work(rank)`` on every replica at once; the results in rank order."""
        import threading

        results, errors = [None] * self.size, []

        def target(rank):
            self._local.rank = rank
            try:
                results[rank] = work(rank)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        if errors:
            raise errors[0]
        return results

    def gather(self, array):
        from portable_bn._compat import array_namespace

        self._slots[self._local.rank] = array
        self._barrier.wait()
        stacked = array_namespace(array).stack(list(self._slots))
        self._barrier.wait()
        return stacked

    def sum(self, array):
        from portable_bn._compat import array_namespace

        stacked = self.gather(array)
        return array_namespace(array).sum(stacked, axis=0)


@pytest.mark.parametrize("sizes", [(3, 5), (4, 0, 2), (1, 1)], ids=["unequal", "one-empty", "one-each"])
@pytest.mark.parametrize("masked", [False, True], ids=["all-valid", "masked"])
def test_sync_equals_one_batch_of_every_replica(vcombo, sizes, masked):
    """Replicas with different batch sizes, none, or one sample each: the statistics, running
    update and input gradients of the concatenated batch (of its valid values); the weight and
    bias gradients are shares that sum to the one-batch gradients."""
    combo = vcombo
    batch = sum(sizes)
    shape = (batch, 3, 4)
    x_host = sample(shape, seed=41)
    grad_host = np.random.default_rng(42).normal(size=shape)
    mask_host = np.random.default_rng(43).random((batch, 4)) < (0.6 if masked else 2.0)
    mask_host[0, :2] = True
    host, arrays = parameters(combo, 3)
    want = masked_reference(
        combo.to_numpy(combo.asarray(x_host)), mask_host, combo.to_numpy(combo.asarray(grad_host)), host, axis=1
    )
    starts = np.cumsum((0, *sizes))
    replicas = ThreadReplicas(len(sizes))

    def replica(rank):
        part = slice(int(starts[rank]), int(starts[rank + 1]))
        x, grad = combo.asarray(x_host[part]), combo.asarray(grad_host[part])
        mask = as_mask(combo, mask_host[part]) if masked else None
        result = pbn.batch_norm(x, **arrays, training=True, mask=mask, sync=replicas)
        grads = pbn.batch_norm_backward(grad, x, arrays["weight"], result.mean, result.invstd, mask=mask, sync=replicas)
        return result, grads

    results = replicas.run(replica)
    checks = []
    for rank, (result, grads) in enumerate(results):
        part = slice(int(starts[rank]), int(starts[rank + 1]))
        checks += [
            check(combo, "output", result.output, want["output"][part], per_channel=False),
            check(combo, "mean", result.mean, want["mean"]),
            check(combo, "running_var", result.running_var, want["running_var"]),
            check(combo, "running_mean", result.running_mean, want["running_mean"]),
            check(combo, "grad_input", grads[0], want["grad_input"][part], per_channel=False),
        ]
    shares = [(combo.to_numpy(grads[1]), combo.to_numpy(grads[2])) for _, grads in results]
    dtype_name = combo.param_dtype_name
    checks.append(
        Check(
            "grad_weight",
            dtype_error(sum(s[0] for s in shares), want["grad_weight"], dtype_name),
            tolerance(dtype_name),
        )
    )
    checks.append(
        Check("grad_bias", dtype_error(sum(s[1] for s in shares), want["grad_bias"], dtype_name), tolerance(dtype_name))
    )
    assert_checks(checks)


def test_sync_module_with_one_replica_of_one_sample_raises_like_pytorch():
    """The one-value check is global: one replica of one sample raises (PyTorch's message);
    two replicas of one sample each are a batch of two."""
    replicas = ThreadReplicas(1)
    bn = pbn.BatchNorm1d(2, xp=np, dtype="float64", sync=replicas)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        replicas.run(lambda rank: bn(np.ones((1, 2))))
    assert int(bn.num_batches_tracked) == 0


def test_module_backward_after_a_ghost_call_uses_its_groups(vcombo):
    combo = vcombo
    x_host = sample((7, 3, 2), seed=47)
    grad_host = np.random.default_rng(48).normal(size=x_host.shape)
    bn = pbn.BatchNorm1d(3, xp=combo.library, device=combo.device, dtype=combo.param_dtype, virtual_batch_size=3)
    x = combo.asarray(x_host)
    bn(x)
    grad_input = bn.backward(combo.asarray(grad_host))
    host = {"running_mean": np.zeros(3), "running_var": np.ones(3), "weight": np.ones(3), "bias": np.zeros(3)}
    want = ghost_reference(combo.to_numpy(x), combo.to_numpy(combo.asarray(grad_host)), host, 3)
    assert_checks(
        [
            check(combo, "grad_input", grad_input, want["grad_input"], per_channel=False),
            check(combo, "weight_grad", bn.weight_grad, want["grad_weight"]),
            check(combo, "bias_grad", bn.bias_grad, want["grad_bias"]),
        ]
    )
