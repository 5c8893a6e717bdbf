"""Converters to and from Keras 3, Flax and ONNX, checked against the real libraries.

Every check compares with what the other framework computes on the same input: evaluation
output, and, where the framework trains, the running statistics after several training steps.
Keras's backend is fixed when Keras is first imported: it follows PBN_BACKENDS (torch or jax),
else whichever of the two is installed.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

import portable_bn as pbn
from conftest import selected_backends


def _keras_backend() -> str | None:
    for name in selected_backends():
        if name.startswith("torch"):
            return "torch"
        if name.startswith("jax"):
            return "jax"
    return next((name for name in ("torch", "jax") if importlib.util.find_spec(name) is not None), None)


_KERAS_BACKEND = _keras_backend()
if _KERAS_BACKEND is not None:  # before anything imports Keras
    os.environ.setdefault("KERAS_BACKEND", _KERAS_BACKEND)

F32 = dict(rtol=2e-5, atol=2e-5)  # float32: the frameworks sum in other orders


def host(value):
    """A NumPy copy of a Keras variable, torch tensor, JAX array or NumPy array."""
    value = getattr(value, "value", value)  # Keras variable -> backend tensor
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def state_of(bn):
    """Everything a converter or a failing call could change, as plain values."""
    attributes = ("num_features", "eps", "momentum", "affine", "axis", "unbiased", "training", "track_running_stats")
    return {name: getattr(bn, name) for name in attributes}, {k: host(v) for k, v in bn.state_dict().items()}


def assert_same_state(before, after):
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    for key in before[1]:
        np.testing.assert_array_equal(before[1][key], after[1][key])


def trained_looking(rng, channels):
    """Random gamma, beta, mean and a positive variance, float32."""
    return (
        rng.uniform(0.5, 2.0, channels).astype(np.float32),
        rng.normal(0.0, 1.0, channels).astype(np.float32),
        rng.normal(0.0, 1.0, channels).astype(np.float32),
        rng.uniform(0.5, 2.0, channels).astype(np.float32),
    )


# ------------------------------------------------------------------------------------- Keras
@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")


def keras_layer(keras, *, axis, shape, momentum=0.8, epsilon=1e-2, rng, **kwargs):
    layer = keras.layers.BatchNormalization(axis=axis, momentum=momentum, epsilon=epsilon, **kwargs)
    layer.build((None, *shape[1:]))
    gamma, beta, mean, var = trained_looking(rng, shape[axis])
    for variable, value in ((layer.gamma, gamma), (layer.beta, beta), (layer.moving_mean, mean)):
        if variable is not None:
            variable.assign(value)
    layer.moving_variance.assign(var)
    return layer


@pytest.mark.parametrize(("axis", "shape"), [(-1, (6, 5, 4, 3)), (1, (6, 3, 5, 4))])
def test_keras_eval_and_training_match(keras, axis, shape):
    rng = np.random.default_rng(0)
    layer = keras_layer(keras, axis=axis, shape=shape, rng=rng)
    bn = pbn.BatchNorm2d.from_keras(layer)
    assert type(bn) is pbn.BatchNorm2d
    assert (bn.num_features, bn.axis, bn.eps, bn.unbiased, bn.affine) == (3, axis, 1e-2, False, True)
    assert bn.momentum == 1.0 - 0.8
    backend = keras.backend.backend()
    assert type(bn.running_mean).__module__.split(".")[0] == {"torch": "torch", "jax": "jaxlib"}.get(backend, "numpy")
    np.testing.assert_array_equal(host(bn.weight), host(layer.gamma))
    np.testing.assert_array_equal(host(bn.running_var), host(layer.moving_variance))

    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    np.testing.assert_allclose(host(bn.eval()(bn.xp.asarray(x))), host(layer(x, training=False)), **F32)
    bn.train()
    for step in range(4):
        x = rng.normal(step, 1.0 + step, shape).astype(np.float32)
        np.testing.assert_allclose(host(bn(bn.xp.asarray(x))), host(layer(x, training=True)), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(host(bn.running_mean), host(layer.moving_mean), **F32)
        np.testing.assert_allclose(host(bn.running_var), host(layer.moving_variance), **F32)
    x = rng.normal(0.0, 3.0, shape).astype(np.float32)
    np.testing.assert_allclose(host(bn.eval()(bn.xp.asarray(x))), host(layer(x, training=False)), **F32)


def test_keras_round_trip(keras):
    rng = np.random.default_rng(1)
    bn = pbn.BatchNorm2d(4, eps=1e-3, momentum=0.25, axis=-1, xp=np)
    gamma, beta, mean, var = trained_looking(rng, 4)
    bn.load_state_dict({"weight": gamma, "bias": beta, "running_mean": mean, "running_var": var})
    before = state_of(bn)
    layer = bn.to_keras()
    assert_same_state(before, state_of(bn))
    assert isinstance(layer, keras.layers.BatchNormalization) and layer.built
    assert (layer.axis, layer.momentum, layer.epsilon, layer.center, layer.scale) == (-1, 0.75, 1e-3, True, True)
    for ours, theirs in (
        (gamma, layer.gamma),
        (beta, layer.beta),
        (mean, layer.moving_mean),
        (var, layer.moving_variance),
    ):
        np.testing.assert_array_equal(host(theirs), ours)
    x = rng.normal(0.5, 2.0, (5, 3, 2, 4)).astype(np.float32)
    np.testing.assert_allclose(host(layer(x, training=False)), bn.eval()(x), **F32)

    back = pbn.BatchNorm2d.from_keras(layer, xp=np)
    assert (back.eps, back.momentum, back.axis, back.unbiased) == (1e-3, 0.25, -1, False)
    for key, value in bn.state_dict().items():
        if key != "num_batches_tracked":
            np.testing.assert_array_equal(back.state_dict()[key], value)


def test_keras_rank_of_the_built_layer(keras):
    one_d = pbn.BatchNorm1d(3, xp=np)
    for ndim in (2, 3):
        layer = one_d.to_keras(ndim=ndim)
        assert layer.input_spec.ndim == ndim
        assert type(pbn.BatchNorm1d.from_keras(layer, xp=np)) is pbn.BatchNorm1d
    assert pbn.BatchNorm3d(2, xp=np).to_keras().input_spec.ndim == 5
    fresh = pbn.BatchNorm2d(3).to_keras()  # no arrays yet: Keras's initial values are ours
    np.testing.assert_array_equal(host(fresh.moving_variance), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="layer was built for 4D inputs but BatchNorm1d takes 2D or 3D"):
        pbn.BatchNorm1d.from_keras(fresh)
    with pytest.raises(ValueError, match="ndim must be 2 or 3 for BatchNorm1d, got 4"):
        one_d.to_keras(ndim=4)
    with pytest.raises(TypeError, match="ndim must be an int"):
        one_d.to_keras(ndim="2")
    with pytest.raises(ValueError, match="axis 3 of BatchNorm1d does not exist in 2D inputs"):
        pbn.BatchNorm1d(3, axis=3, xp=np).to_keras()


@pytest.mark.parametrize(("scale", "center"), [(False, True), (True, False), (False, False)])
def test_keras_without_scale_or_center(keras, scale, center):
    rng = np.random.default_rng(2)
    shape = (8, 5, 3)
    layer = keras_layer(keras, axis=-1, shape=shape, rng=rng, scale=scale, center=center)
    bn = pbn.BatchNorm1d.from_keras(layer, xp=np)
    assert bn.affine is (scale or center)
    if bn.affine:
        np.testing.assert_array_equal(bn.weight, host(layer.gamma) if scale else np.ones(3, np.float32))
        np.testing.assert_array_equal(bn.bias, host(layer.beta) if center else np.zeros(3, np.float32))
    else:
        assert bn.weight is None and bn.bias is None
        again = bn.to_keras(ndim=3)
        assert (again.scale, again.center, again.gamma, again.beta) == (False, False, None, None)
    x = rng.normal(0.0, 2.0, shape).astype(np.float32)
    np.testing.assert_allclose(bn.eval()(x), host(layer(x, training=False)), **F32)
    bn.train()
    for _ in range(2):
        x = rng.normal(1.0, 2.0, shape).astype(np.float32)
        np.testing.assert_allclose(bn(x), host(layer(x, training=True)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.running_var, host(layer.moving_variance), **F32)


def test_keras_errors(keras):
    dense = keras.layers.Dense(3)
    with pytest.raises(TypeError, match=r"layer must be a keras\.layers\.BatchNormalization layer, got Dense"):
        pbn.BatchNorm1d.from_keras(dense)
    with pytest.raises(TypeError, match=r"layer must be a keras\.layers\.BatchNormalization layer, got dict"):
        pbn.BatchNorm1d.from_keras({"gamma": np.ones(3)})
    with pytest.raises(ValueError, match=r"layer is not built.*layer.build\(input_shape\)"):
        pbn.BatchNorm1d.from_keras(keras.layers.BatchNormalization())
    renorm = keras.layers.BatchNormalization(renorm=True)
    renorm.build((None, 3))
    with pytest.raises(ValueError, match="renorm=True"):
        pbn.BatchNorm1d.from_keras(renorm)


# -------------------------------------------------------------------------------------- Flax
@pytest.fixture(scope="module")
def flax_linen():
    pytest.importorskip("jax")
    return pytest.importorskip("flax.linen")


@pytest.fixture(scope="module")
def nnx():
    pytest.importorskip("jax")
    return pytest.importorskip("flax.nnx")


def test_flax_linen_eval_and_training_match(flax_linen):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    shape = (6, 7, 4)  # (N, L, C), channels-last
    gamma, beta, mean, var = trained_looking(rng, 4)
    variables = {
        "params": {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)},
        "batch_stats": {"mean": jnp.asarray(mean), "var": jnp.asarray(var)},
    }
    bn = pbn.BatchNorm1d.from_flax(variables, momentum=0.8, epsilon=1e-2)
    assert (bn.axis, bn.eps, bn.momentum, bn.unbiased) == (-1, 1e-2, 1.0 - 0.8, False)
    assert isinstance(bn.running_var, jax.Array)
    evaluate = flax_linen.BatchNorm(use_running_average=True, momentum=0.8, epsilon=1e-2)
    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    np.testing.assert_allclose(bn.eval()(jnp.asarray(x)), evaluate.apply(variables, x), **F32)

    train = flax_linen.BatchNorm(use_running_average=False, momentum=0.8, epsilon=1e-2)
    bn.train()
    for step in range(4):
        x = rng.normal(step, 1.0 + step, shape).astype(np.float32)
        y, updates = train.apply(variables, x, mutable=["batch_stats"])
        variables = {"params": variables["params"], **updates}
        np.testing.assert_allclose(bn(jnp.asarray(x)), y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(bn.running_mean, variables["batch_stats"]["mean"], **F32)
        np.testing.assert_allclose(bn.running_var, variables["batch_stats"]["var"], **F32)

    exported = bn.to_flax()
    assert jax.tree.structure(exported) == jax.tree.structure(variables)
    x = rng.normal(0.0, 3.0, shape).astype(np.float32)
    np.testing.assert_allclose(evaluate.apply(exported, x), bn.eval()(jnp.asarray(x)), **F32)


def test_flax_nnx_eval_and_training_match(nnx):
    import jax.numpy as jnp

    rng = np.random.default_rng(4)
    shape = (5, 3, 4, 4)  # NCHW: axis 1
    layer = nnx.BatchNorm(3, axis=1, momentum=0.7, epsilon=1e-3, rngs=nnx.Rngs(0))
    gamma, beta, mean, var = trained_looking(rng, 3)
    for variable, value in ((layer.scale, gamma), (layer.bias, beta), (layer.mean, mean), (layer.var, var)):
        variable[...] = jnp.asarray(value)
    bn = pbn.BatchNorm2d.from_flax(layer)  # its own momentum, epsilon and axis
    assert (bn.axis, bn.eps, bn.momentum, bn.unbiased) == (1, 1e-3, 1.0 - 0.7, False)
    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    np.testing.assert_allclose(bn.eval()(jnp.asarray(x)), layer(jnp.asarray(x), use_running_average=True), **F32)
    bn.train()
    for step in range(3):
        x = jnp.asarray(rng.normal(step, 1.0 + step, shape).astype(np.float32))
        np.testing.assert_allclose(bn(x), layer(x, use_running_average=False), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(bn.running_mean, layer.mean[...], **F32)
        np.testing.assert_allclose(bn.running_var, layer.var[...], **F32)


def test_flax_nnx_without_scale_and_keywords(nnx):
    layer = nnx.BatchNorm(2, use_scale=False, rngs=nnx.Rngs(0))
    bn = pbn.BatchNorm1d.from_flax(layer, xp=np)
    assert bn.affine and isinstance(bn.weight, np.ndarray)
    np.testing.assert_array_equal(bn.weight, np.ones(2, np.float32))
    assert (bn.momentum, bn.eps, bn.axis) == (1.0 - 0.99, 1e-5, -1)
    assert not pbn.BatchNorm1d.from_flax(nnx.BatchNorm(2, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))).affine
    with pytest.raises(ValueError, match=r"momentum, axis are read from the nnx\.BatchNorm"):
        pbn.BatchNorm1d.from_flax(layer, momentum=0.9, axis=1)


def test_flax_dicts_of_any_library(flax_linen):
    import jax.numpy as jnp

    rng = np.random.default_rng(5)
    _, beta, mean, var = trained_looking(rng, 3)
    only_bias = {"params": {"bias": beta}, "batch_stats": {"mean": mean, "var": var}}
    bn = pbn.BatchNorm1d.from_flax(only_bias, momentum=0.9, epsilon=1e-3)
    assert isinstance(bn.weight, np.ndarray)  # NumPy in, NumPy module
    np.testing.assert_array_equal(bn.weight, np.ones(3, np.float32))
    x = rng.normal(0.0, 2.0, (4, 3)).astype(np.float32)
    linen = flax_linen.BatchNorm(use_running_average=True, use_scale=False, epsilon=1e-3)
    np.testing.assert_allclose(bn.eval()(x), linen.apply(only_bias, x), **F32)

    no_params = {"batch_stats": {"mean": mean.tolist(), "var": var.tolist()}}  # lists: float64
    plain = pbn.BatchNorm1d.from_flax(no_params)
    assert not plain.affine and plain.running_var.dtype == np.float64
    exported = plain.to_flax()
    assert list(exported) == ["batch_stats"]
    linen = flax_linen.BatchNorm(use_running_average=True, use_scale=False, use_bias=False)
    np.testing.assert_allclose(linen.apply(exported, x), plain.eval()(x.astype(np.float64)), **F32)

    as_jax = pbn.BatchNorm1d.from_flax(only_bias, xp=jnp)
    assert type(as_jax.running_mean).__module__.startswith("jax")


def test_flax_round_trip_without_flax():
    """to_flax and from_flax need no Flax: dicts of the module's own arrays."""
    rng = np.random.default_rng(6)
    bn = pbn.BatchNorm2d(3, eps=1e-4, momentum=0.3, axis=-1, xp=np)
    _ = bn(rng.normal(size=(4, 2, 2, 3)).astype(np.float32))
    before = state_of(bn)
    variables = bn.to_flax()
    assert_same_state(before, state_of(bn))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], bn.running_var)
    np.testing.assert_array_equal(variables["params"]["scale"], bn.weight)
    back = pbn.BatchNorm2d.from_flax(variables, momentum=1.0 - bn.momentum, epsilon=bn.eps, axis=bn.axis)
    assert back.momentum == pytest.approx(bn.momentum, rel=1e-15)  # 1 - (1 - m): Python floats
    assert (back.eps, back.axis) == (bn.eps, bn.axis)
    for key in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(back, key), getattr(bn, key))


def test_flax_errors():
    good = {
        "params": {"scale": np.ones(3), "bias": np.zeros(3)},
        "batch_stats": {"mean": np.zeros(3), "var": np.ones(3)},
    }
    snapshot = {group: dict(values) for group, values in good.items()}
    with pytest.raises(TypeError, match="variables must be a mapping"):
        pbn.BatchNorm1d.from_flax([np.ones(3)])
    with pytest.raises(ValueError, match='variables must hold "batch_stats"'):
        pbn.BatchNorm1d.from_flax({"params": good["params"]})
    with pytest.raises(ValueError, match=r"variables has unexpected keys \['cache'\]"):
        pbn.BatchNorm1d.from_flax({**good, "cache": {}})
    nested = {"params": {"BatchNorm_0": good["params"]}, "batch_stats": {"BatchNorm_0": good["batch_stats"]}}
    with pytest.raises(ValueError, match=r"variables\['params'\] has unexpected keys \['BatchNorm_0'\]"):
        pbn.BatchNorm1d.from_flax(nested)
    with pytest.raises(ValueError, match=r"variables\['batch_stats'\] is missing \['var'\]"):
        pbn.BatchNorm1d.from_flax({"batch_stats": {"mean": np.zeros(3)}})
    with pytest.raises(TypeError, match=r"variables\['batch_stats'\] must be a mapping"):
        pbn.BatchNorm1d.from_flax({"batch_stats": [np.zeros(3)]})
    short = {**good, "batch_stats": {"mean": np.zeros(2), "var": np.ones(3)}}
    with pytest.raises(ValueError, match=r"disagree on the number of channels: .*\['mean'\] \(2,\)"):
        pbn.BatchNorm1d.from_flax(short)
    with pytest.raises(ValueError, match=r"\['var'\] must be a vector"):
        pbn.BatchNorm1d.from_flax({"batch_stats": {"mean": np.zeros(3), "var": np.ones((3, 1))}})
    with pytest.raises(TypeError, match=r"\['scale'\] must be an array of real floating values"):
        pbn.BatchNorm1d.from_flax({**good, "params": {"scale": np.ones(3, dtype=np.int64)}})
    with pytest.raises(TypeError, match="momentum must be a real number"):
        pbn.BatchNorm1d.from_flax(good, momentum="0.9")
    with pytest.raises(ValueError, match="axis must be one channel axis"):
        pbn.BatchNorm1d.from_flax(good, axis=(1, 2))
    assert {group: dict(values) for group, values in good.items()} == snapshot  # nothing was changed


# -------------------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def onnx():
    return pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def ort():
    return pytest.importorskip("onnxruntime")


def onnx_model(onnx, nodes, params, *, channels, opset=15, ir_version=None, params_as_inputs=False, outputs=("y",)):
    from onnx import TensorProto, helper, numpy_helper

    element = TensorProto.DOUBLE if next(iter(params.values())).dtype == np.float64 else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", element, [None, channels, 4, 4])]
    if params_as_inputs:  # IR version < 4: every initializer is also a graph input
        inputs += [helper.make_tensor_value_info(name, element, list(value.shape)) for name, value in params.items()]
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info(name, element, None) for name in outputs],
        initializer=[numpy_helper.from_array(value, name) for name, value in params.items()],
    )
    kwargs = {} if ir_version is None else {"ir_version": ir_version}
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)


def run_onnx(ort, model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def bn_params(rng, channels, prefix="", dtype=np.float32):
    names = ("scale", "B", "mean", "var")
    return {
        prefix + name: value.astype(dtype) for name, value in zip(names, trained_looking(rng, channels), strict=True)
    }


def test_onnx_opset15_eval_matches_onnxruntime(onnx, ort):
    from onnx import helper

    rng = np.random.default_rng(7)
    params = bn_params(rng, 3)
    node = helper.make_node(
        "BatchNormalization", ["x", *params], ["y"], name="bn", epsilon=1e-3, momentum=0.8, training_mode=0
    )
    model = onnx_model(onnx, [node], params, channels=3)
    bn = pbn.BatchNorm2d.from_onnx(model)
    assert isinstance(bn.running_mean, np.ndarray) and bn.running_mean.dtype == np.float32
    assert (bn.axis, bn.unbiased) == (1, False)
    assert bn.eps == pytest.approx(1e-3, rel=1e-7) and bn.momentum == pytest.approx(0.2, rel=1e-6)
    np.testing.assert_array_equal(bn.weight, params["scale"])
    x = rng.normal(1.0, 2.0, (5, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(bn.eval()(x), run_onnx(ort, model, x)[0], **F32)


def test_onnx_training_mode_matches_onnxruntime(onnx, ort):
    """A training_mode=1 node: batch statistics and ONNX's running update (biased variance)."""
    from onnx import helper

    rng = np.random.default_rng(8)
    params = bn_params(rng, 3)
    node = helper.make_node(
        "BatchNormalization", ["x", *params], ["y", "rm", "rv"], name="bn", epsilon=1e-3, momentum=0.7, training_mode=1
    )
    model = onnx_model(onnx, [node], params, channels=3, outputs=("y", "rm", "rv"))
    bn = pbn.BatchNorm2d.from_onnx(model)
    x = rng.normal(2.0, 3.0, (4, 3, 4, 4)).astype(np.float32)
    y, running_mean, running_var = run_onnx(ort, model, x)
    np.testing.assert_allclose(bn(x), y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.running_mean, running_mean, **F32)
    np.testing.assert_allclose(bn.running_var, running_var, **F32)


def test_onnx_defaults_and_double(onnx, ort):
    from onnx import helper

    rng = np.random.default_rng(9)
    params = bn_params(rng, 2, dtype=np.float64)
    model = onnx_model(onnx, [helper.make_node("BatchNormalization", ["x", *params], ["y"])], params, channels=2)
    bn = pbn.BatchNorm2d.from_onnx(model)  # unnamed, no attributes: ONNX's defaults
    assert bn.momentum == 1.0 - 0.9 and bn.eps == 1e-5
    assert bn.running_var.dtype == np.float64
    x = rng.normal(size=(3, 2, 4, 4))
    np.testing.assert_allclose(bn.eval()(x), run_onnx(ort, model, x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("opset", [6, 7])
def test_onnx_old_opsets(onnx, ort, opset):
    """Parameters listed as graph inputs too (IR version 3), ``is_test`` (opset 6) and ``spatial``."""
    from onnx import helper, version_converter

    rng = np.random.default_rng(10)
    params = bn_params(rng, 3)
    attributes = {"epsilon": 1e-2, "momentum": 0.95, "spatial": 1, **({"is_test": 1} if opset < 7 else {})}
    node = helper.make_node("BatchNormalization", ["x", *params], ["y"], name="old", **attributes)
    model = onnx_model(onnx, [node], params, channels=3, opset=opset, ir_version=3, params_as_inputs=True)
    bn = pbn.BatchNorm2d.from_onnx(model)
    assert bn.momentum == pytest.approx(0.05, rel=1e-6) and bn.eps == pytest.approx(1e-2, rel=1e-7)
    # onnxruntime runs opset 7 and later: opset 6 is compared through ONNX's own version converter
    runnable = model if opset >= 7 else version_converter.convert_version(model, 9)
    x = rng.normal(1.0, 2.0, (2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(bn.eval()(x), run_onnx(ort, runnable, x)[0], **F32)


def test_onnx_node_selection(onnx, ort):
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(11)
    first, second = bn_params(rng, 3, "a_"), bn_params(rng, 3, "b_")
    nodes = [
        helper.make_node("BatchNormalization", ["x", *first], ["h"], name="bn_a"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("BatchNormalization", ["r", *second], ["y"], name="bn_b", epsilon=1e-4),
    ]
    model = onnx_model(onnx, nodes, {**first, **second}, channels=3)
    with pytest.raises(ValueError, match="model has 2 BatchNormalization nodes; choose one with node=: 'bn_a', 'bn_b'"):
        pbn.BatchNorm2d.from_onnx(model)
    with pytest.raises(
        ValueError, match="no BatchNormalization node 'bn_c'; its BatchNormalization nodes: 'bn_a', 'bn_b'"
    ):
        pbn.BatchNorm2d.from_onnx(model, "bn_c")
    a = pbn.BatchNorm2d.from_onnx(model, "bn_a").eval()
    b = pbn.BatchNorm2d.from_onnx(model, node="bn_b").eval()
    np.testing.assert_array_equal(b.weight, second["b_scale"])
    assert b.eps == pytest.approx(1e-4, rel=1e-7) and a.eps == 1e-5
    x = rng.normal(0.0, 2.0, (2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(b(np.maximum(a(x), 0)), run_onnx(ort, model, x)[0], **F32)

    # unnamed nodes are chosen by their output; parameters may come from Constant nodes
    constant = helper.make_node("Constant", [], ["c_var"], value=numpy_helper.from_array(second["b_var"], "c_var"))
    unnamed = helper.make_node("BatchNormalization", ["x", "b_scale", "b_B", "b_mean", "c_var"], ["y"])
    params = {k: v for k, v in second.items() if k != "b_var"}
    other = onnx_model(onnx, [constant, unnamed, helper.make_node("Relu", ["x"], ["z"])], params, channels=3)
    np.testing.assert_array_equal(pbn.BatchNorm2d.from_onnx(other, node="y").running_var, second["b_var"])


def test_onnx_errors(onnx):
    from onnx import helper

    params = bn_params(np.random.default_rng(12), 3)
    relu = onnx_model(onnx, [helper.make_node("Relu", ["x"], ["y"])], params, channels=3)
    with pytest.raises(ValueError, match="model has no BatchNormalization node"):
        pbn.BatchNorm2d.from_onnx(relu)
    with pytest.raises(TypeError, match=r"model must be an onnx.ModelProto \(onnx.load\(path\)\), got str"):
        pbn.BatchNorm2d.from_onnx("model.onnx")
    node = helper.make_node("BatchNormalization", ["x", *params], ["y"], name="bn")
    model = onnx_model(onnx, [node], params, channels=3)
    with pytest.raises(TypeError, match="node must be a node name"):
        pbn.BatchNorm2d.from_onnx(model, node=0)
    runtime_scale = onnx_model(onnx, [node], {k: v for k, v in params.items() if k != "scale"}, channels=3)
    runtime_scale.graph.input.append(helper.make_tensor_value_info("scale", onnx.TensorProto.FLOAT, [3]))
    with pytest.raises(ValueError, match="scale 'scale' is a graph input without initializer"):
        pbn.BatchNorm2d.from_onnx(runtime_scale)
    spatial = helper.make_node("BatchNormalization", ["x", *params], ["y"], spatial=0)
    per_activation = {k: np.broadcast_to(v[:, None, None], (3, 4, 4)).copy() for k, v in params.items()}
    with pytest.raises(ValueError, match=r"per-activation statistics \(spatial=0\)"):
        pbn.BatchNorm2d.from_onnx(onnx_model(onnx, [spatial], per_activation, channels=3, opset=7))


def test_onnx_target_library(onnx):
    from onnx import helper

    torch = pytest.importorskip("torch")
    params = bn_params(np.random.default_rng(13), 3)
    model = onnx_model(onnx, [helper.make_node("BatchNormalization", ["x", *params], ["y"])], params, channels=3)
    bn = pbn.BatchNorm2d.from_onnx(model, xp=torch)
    assert isinstance(bn.weight, torch.Tensor) and bn.weight.requires_grad
    np.testing.assert_array_equal(bn.running_var.numpy(), params["var"])


# ------------------------------------------------------------------------------------ errors
def test_export_refusals_change_nothing():
    bn = pbn.BatchNorm1d(3, momentum=None, xp=np)
    _ = bn(np.arange(6, dtype=np.float32).reshape(2, 3))
    before = state_of(bn)
    with pytest.raises(ValueError, match=r"BatchNorm1d\(momentum=None\) keeps a cumulative average, which Flax"):
        bn.to_flax()
    assert_same_state(before, state_of(bn))
    untracked = pbn.BatchNorm1d(3, track_running_stats=False, xp=np)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        untracked.to_flax()
    with pytest.raises(ValueError, match="has no arrays yet"):
        pbn.BatchNorm1d(3).to_flax()


def test_keras_export_refusals_change_nothing(keras):
    bn = pbn.BatchNorm1d(3, momentum=None, xp=np)
    _ = bn(np.arange(6, dtype=np.float32).reshape(2, 3))
    before = state_of(bn)
    with pytest.raises(ValueError, match=r"BatchNorm1d\(momentum=None\) keeps a cumulative average, which Keras"):
        bn.to_keras()
    assert_same_state(before, state_of(bn))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        pbn.BatchNorm1d(3, track_running_stats=False).to_keras()


def test_missing_libraries_name_the_extra(monkeypatch):
    bn = pbn.BatchNorm1d(3, xp=np)
    monkeypatch.setitem(sys.modules, "keras", None)
    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.setitem(sys.modules, "flax.nnx", None)
    with pytest.raises(ImportError, match=r"BatchNorm1d.to_keras needs keras: pip install 'portable_bn\[keras\]'"):
        bn.to_keras()
    with pytest.raises(ImportError, match=r"from_keras needs keras: pip install 'portable_bn\[keras\]'"):
        pbn.BatchNorm1d.from_keras(object())
    with pytest.raises(ImportError, match=r"BatchNorm2d.from_onnx needs onnx: pip install 'portable_bn\[onnx\]'"):
        pbn.BatchNorm2d.from_onnx(object())
    with pytest.raises(TypeError, match=r"Flax is not installed: pip install 'portable_bn\[flax\]'"):
        pbn.BatchNorm1d.from_flax(object())


def test_converters_return_the_class_they_are_called_on():
    variables = {"batch_stats": {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}}
    for cls in (pbn.BatchNorm1d, pbn.BatchNorm2d, pbn.BatchNorm3d):
        bn = cls.from_flax(variables, axis=1)
        assert type(bn) is cls and bn.training and bn.num_features == 4
