"""ONNX export: eval as the standard BatchNormalization node, training as the module's own
computation traced on ndonnx arrays with a symbolic batch size; onnxruntime runs both and
matches the NumPy module for different batch sizes."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import portable_bn as pbn
from portable_bn.testing import max_error, sample

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
ndx = pytest.importorskip("ndonnx")

F32 = 4e-6  # float32 rounding of values of order 1 to 10, a few operations apart


def trained(module: pbn.BatchNorm1d, shape: tuple[int, ...], *, steps: int = 3) -> pbn.BatchNorm1d:
    """The module after a few training steps on data of ``shape`` (random weight and bias)."""
    rng = np.random.default_rng(1)
    dtype = np.dtype(module.running_mean.dtype)
    if module.affine:
        module.load_state_dict(
            {
                "weight": rng.uniform(0.5, 2.0, module.num_features),
                "bias": rng.normal(size=module.num_features),
            },
            strict=False,
        )
    for seed in range(steps):
        module(sample(shape, seed=seed).astype(dtype) * 3.0 + 2.0)
    return module


def run(model, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


CASES = {
    "2d": (lambda: pbn.BatchNorm2d(3, xp=np), (4, 3, 5, 6)),
    "2d-channels-last": (lambda: pbn.BatchNorm2d(3, axis=-1, xp=np), (4, 5, 6, 3)),
    "2d-no-affine": (lambda: pbn.BatchNorm2d(3, affine=False, xp=np), (4, 3, 5, 6)),
    "1d-NC": (lambda: pbn.BatchNorm1d(5, xp=np), (6, 5)),
    "1d-NCL-momentum-None": (lambda: pbn.BatchNorm1d(2, momentum=None, xp=np), (3, 2, 7)),
    "3d-float64": (lambda: pbn.BatchNorm3d(2, xp=np, dtype="float64"), (2, 2, 3, 4, 5)),
    "2d-biased": (lambda: pbn.BatchNorm2d(3, unbiased=False, eps=1e-3, momentum=0.3, xp=np), (4, 3, 5, 6)),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
@pytest.mark.parametrize("case", list(CASES))
def test_exported_model_matches_numpy_for_two_batch_sizes(case, training):
    make, shape = CASES[case]
    module = trained(make(), shape)
    module.train(training)
    model = module.to_onnx(training=training, shape=(None, *shape[1:]))
    onnx.checker.check_model(model, full_check=True)
    dtype = np.dtype(module.running_mean.dtype)
    for batch in (2, 9):
        x = sample((batch, *shape[1:]), seed=batch).astype(dtype) * 4.0 - 1.0
        reference = copy.copy(module)  # the NumPy module's own call, from the same state
        want = reference(x)
        got = run(model, x)
        tol = F32 if dtype == np.float32 else 1e-12
        assert got[0].dtype == dtype and got[0].shape == x.shape
        assert max_error(got[0], want) <= tol * 10
        if training:
            assert len(got) == 3
            assert max_error(got[1], reference.running_mean) <= tol
            assert max_error(got[2], reference.running_var) <= tol
        else:
            assert len(got) == 1


def test_eval_model_is_the_standard_node_with_named_initializers():
    module = trained(pbn.BatchNorm2d(3, eps=1e-3, momentum=0.2, xp=np), (4, 3, 2, 2)).eval()
    model = module.to_onnx()
    assert [node.op_type for node in model.graph.node] == ["BatchNormalization"]
    node = model.graph.node[0]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes["epsilon"] == pytest.approx(1e-3)
    assert attributes["momentum"] == pytest.approx(0.8)  # ONNX's momentum is 1 - ours
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert sorted(initializers) == ["bias", "running_mean", "running_var", "weight"]
    for key, value in module.state_dict().items():
        if key != "num_batches_tracked":
            np.testing.assert_array_equal(initializers[key], value)
    (x_input,) = model.graph.input
    dims = x_input.type.tensor_type.shape.dim
    assert x_input.name == "x" and dims[0].dim_param == "N" and dims[1].dim_value == 3
    assert [output.name for output in model.graph.output] == ["y"]


def test_channels_last_eval_is_transposed_around_the_node():
    module = trained(pbn.BatchNorm2d(3, axis=-1, xp=np), (4, 5, 6, 3)).eval()
    ops = [node.op_type for node in module.to_onnx(shape=(None, 5, 6, 3)).graph.node]
    assert ops == ["Transpose", "BatchNormalization", "Transpose"]


def test_training_model_outputs_and_symbolic_batch():
    module = trained(pbn.BatchNorm2d(3, xp=np), (4, 3, 5, 6))
    model = module.to_onnx(training=True, shape=(8, 3, 5, 6))
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == ["y", "running_mean", "running_var"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [3, 5, 6]
    fixed = module.to_onnx(training=True, dynamic_batch=False, shape=(8, 3, 5, 6))
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 8
    x = sample((8, 3, 5, 6), seed=3).astype(np.float32)
    reference = copy.copy(module)
    want = reference(x)
    got = run(fixed, x)
    assert max_error(got[0], want) <= 10 * F32
    assert max_error(got[2], reference.running_var) <= F32


def test_default_shape_has_symbolic_sizes_and_the_lowest_rank():
    model = trained(pbn.BatchNorm1d(4, xp=np), (5, 4)).to_onnx(training=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 4]
    model = pbn.BatchNorm2d(3, xp=np).to_onnx()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, "D1", "D2"]
    for batch, height in ((1, 2), (3, 7)):  # the symbolic spatial sizes vary too
        x = sample((batch, 3, height, 5), seed=height).astype(np.float32)
        assert max_error(run(model, x)[0], pbn.BatchNorm2d(3, xp=np).eval()(x)) <= F32


def test_exporting_changes_nothing():
    module = trained(pbn.BatchNorm2d(3, momentum=None, xp=np), (4, 3, 2, 2))
    before = {key: (value, value.copy()) for key, value in module.state_dict().items()}
    attributes = dict(vars(module))
    module.to_onnx(training=True)
    module.to_onnx(training=False)
    assert vars(module).keys() == attributes.keys()
    for key, value in vars(module).items():
        assert value is attributes[key], key
    for key, (value, copied) in before.items():
        np.testing.assert_array_equal(value, copied)
        assert module.state_dict()[key] is value
    assert module.training is True and module.xp.__name__ == "array_api_compat.numpy"


def test_frozen_and_untracked_modules_export_what_they_compute():
    frozen = trained(pbn.BatchNorm2d(3, xp=np), (4, 3, 2, 2)).freeze()
    x = sample((5, 3, 2, 2), seed=7).astype(np.float32)
    got = run(frozen.to_onnx(training=True, shape=(None, 3, 2, 2)), x)
    assert max_error(got[0], copy.copy(frozen)(x)) <= 10 * F32
    np.testing.assert_array_equal(got[1], frozen.running_mean)  # a frozen module keeps them
    np.testing.assert_array_equal(got[2], frozen.running_var)

    untracked = pbn.BatchNorm2d(3, track_running_stats=False, xp=np).eval()
    model = untracked.to_onnx(shape=(None, 3, 2, 2))
    assert "BatchNormalization" not in [node.op_type for node in model.graph.node]
    got = run(model, x)
    assert len(got) == 1 and max_error(got[0], untracked(x)) <= 10 * F32


def test_export_errors():
    with pytest.raises(ValueError, match="no parameters yet"):
        pbn.BatchNorm2d(3).to_onnx()
    module = pbn.BatchNorm2d(3, xp=np)
    with pytest.raises(ValueError, match="takes 4-D input"):
        module.to_onnx(shape=(2, 3))
    with pytest.raises(ValueError, match="has 4 channels along axis 1"):
        module.to_onnx(shape=(2, 4, 5, 5))
    with pytest.raises(ValueError, match="dynamic_batch=False needs the batch size"):
        module.to_onnx(dynamic_batch=False)
    with pytest.raises(TypeError, match="shape must hold non-negative ints"):
        module.to_onnx(shape=(2, 3, 1.5, 2))
    with pytest.raises(TypeError, match="training must be True or False"):
        module.to_onnx(training="yes")
    with pytest.raises(ValueError, match="virtual_batch_size= need every size"):
        pbn.BatchNorm2d(3, virtual_batch_size=2, xp=np).to_onnx(training=True)


# ---------------------------------------------------------------- symbolic sizes in the functions


def test_batch_norm_with_a_symbolic_batch_matches_numpy():
    rng = np.random.default_rng(0)
    running_mean, running_var = rng.normal(size=3), rng.uniform(0.5, 2.0, size=3)
    weight, bias = rng.normal(size=3), rng.normal(size=3)
    params = [ndx.asarray(value.astype(np.float32)) for value in (running_mean, running_var, weight, bias)]
    x = ndx.argument(shape=("N", 3, "W"), dtype=ndx.float32)
    result = pbn.batch_norm(x, *params, training=True, momentum=0.25, unbiased=False)
    assert result.output.shape == (None, 3, None)
    outputs = {"y": result.output, "running_mean": result.running_mean, "running_var": result.running_var}
    outputs.update(mean=result.mean, invstd=result.invstd)
    model = ndx.build({"x": x}, outputs)
    for shape in ((2, 3, 5), (11, 3, 1), (4, 3, 300)):
        data = (sample(shape, seed=shape[0]) * 2.0 + 5.0).astype(np.float32)
        got = run(model, data)
        want = pbn.batch_norm(
            data, *(value.astype(np.float32) for value in (running_mean, running_var, weight, bias)),
            training=True, momentum=0.25, unbiased=False,
        )  # fmt: skip
        for got_value, want_value in zip(got, want, strict=True):
            assert max_error(got_value, want_value) <= 10 * F32


def test_symbolic_sizes_refuse_what_needs_them():
    x = ndx.argument(shape=("N", 3, 4), dtype=ndx.float32)
    with pytest.raises(ValueError, match="mask= and virtual_batch_size= need every size"):
        pbn.batch_norm(x, training=True, mask=ndx.argument(shape=("N", 4), dtype=ndx.bool))
    with pytest.raises(ValueError, match="mask= and virtual_batch_size= need every size"):
        pbn.batch_norm(x, training=True, virtual_batch_size=2)
    channels = ndx.argument(shape=(2, "C"), dtype=ndx.float32)
    with pytest.raises(ValueError, match="symbolic size along its channel axis 1"):
        pbn.batch_norm(channels, training=True)


def test_exported_eval_model_imports_back():
    module = trained(pbn.BatchNorm2d(3, eps=1e-3, momentum=0.25, xp=np), (4, 3, 2, 2)).eval()
    back = pbn.BatchNorm2d.from_onnx(module.to_onnx())
    assert isinstance(back, pbn.BatchNorm2d)
    assert back.eps == pytest.approx(1e-3) and back.momentum == pytest.approx(0.25) and back.unbiased is False
    for key in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(back.state_dict()[key], module.state_dict()[key])
