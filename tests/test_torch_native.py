"""PyTorch's own kernels behind portable_bn's functions equal the pure primitives and the reference.

On the CPU with PBN_BACKENDS=torch, on CUDA with PBN_BACKENDS=torch_gpu (the ``device``
fixture runs every test on each selected device). ``both_paths`` runs each call again on the
pure array-API primitives. A spy records whether the native kernels' result was kept, so
each test also proves which path ran: benign data must take the native kernels, hard data
must be handed over to the shared algorithm.
"""

from __future__ import annotations

import numpy as np
import pytest

import portable_bn as pbn
from conftest import both_paths, selected_backends
from portable_bn import _agnostic
from portable_bn.testing import max_error, reference_backward, reference_batch_norm, tolerance

pytestmark = pytest.mark.skipif(
    not {"torch", "torch_gpu"} & set(selected_backends()), reason="torch/torch_gpu not selected by PBN_BACKENDS"
)

torch = pytest.importorskip("torch")
torch_backend = pytest.importorskip("portable_bn._backends.torch")

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ["cpu"] if "torch" in selected_backends() else []
if "torch_gpu" in selected_backends():
    DEVICES.append(pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")))
DEVICE = "cpu"
"""The device of the running test (set by the autouse ``device`` fixture); ``t`` puts data there."""


@pytest.fixture(autouse=True, params=DEVICES)
def device(request):
    global DEVICE
    DEVICE = request.param
    yield DEVICE
    DEVICE = "cpu"


@pytest.fixture(autouse=True)
def _pytorch_kernels_only(monkeypatch):
    """These tests are about PyTorch's own kernels: the Triton ones (CUDA) are switched off."""
    monkeypatch.setenv(torch_backend.TRITON_SWITCH, "0")


@pytest.fixture
def spy(monkeypatch):
    """Record, per call, whether the native result was kept (True) or handed over (False)."""
    monkeypatch.setattr(torch_backend, "MIN_EVAL_ELEMENTS", 0)  # small test inputs take the native eval too
    kept: list[bool] = []
    for name in ("native_train_forward", "native_eval_forward"):
        original = getattr(_agnostic, name)

        def wrapper(*args, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            kept.append(result is not None)
            return result

        monkeypatch.setattr(_agnostic, name, wrapper)
    return kept


def t(array, dtype):
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=DEVICE, dtype=dtype)


def benign(shape, seed):
    """Per-channel offsets up to 4 standard deviations: the native kernels' domain."""
    rng = np.random.default_rng(seed)
    channels = shape[1]
    param_shape = [1] * len(shape)
    param_shape[1] = channels
    spread = np.linspace(0.5, 3.0, channels).reshape(param_shape)
    offset = spread * np.linspace(-4.0, 4.0, channels).reshape(param_shape)
    return offset + spread * rng.standard_normal(shape)


SHAPES = [(6, 4), (4, 3, 7), (5, 3, 4, 6), (2, 3, 2, 3, 4), (16, 8, 12, 12)]


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_native_path_equals_the_pure_primitives(spy, dtype_name, shape, training, affine):
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(0)
    channels = shape[1]
    x_np = benign(shape, seed=1)
    rm_np, rv_np = rng.uniform(-2, 2, channels), rng.uniform(0.5, 2, channels)
    w_np = rng.uniform(0.5, 2, channels) if affine else None
    b_np = rng.normal(size=channels) if affine else None
    x, rm, rv = t(x_np, dtype), t(rm_np, dtype), t(rv_np, dtype)
    w = None if w_np is None else t(w_np, dtype)
    b = None if b_np is None else t(b_np, dtype)
    rm_before, rv_before = rm.clone(), rv.clone()
    fast, pure = both_paths(pbn.batch_norm, x, rm, rv, w, b, training=training, momentum=0.3)
    assert spy == [True], "benign data must take the native kernels"
    assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before), "arguments must not be written to"
    expected = reference_batch_norm(
        x.double().cpu().numpy(), rm.double().cpu().numpy(), rv.double().cpu().numpy(),
        None if w is None else w.double().cpu().numpy(), None if b is None else b.double().cpu().numpy(),
        training=training, momentum=0.3,
    )  # fmt: skip
    tol = tolerance(dtype_name)
    for name in ("output", "running_mean", "running_var", "mean", "invstd"):
        f, a = getattr(fast, name), getattr(pure, name)
        assert f.dtype == a.dtype and f.shape == a.shape, name
        assert not f.requires_grad or name in ("output", "mean", "invstd"), name
        assert max_error(f.cpu().numpy(), a.cpu().numpy()) <= tol, name
        assert max_error(f.cpu().numpy(), expected[name]) <= tol, name
    grad = t(rng.normal(size=shape), dtype)
    fast_grads, pure_grads = both_paths(pbn.batch_norm_backward, grad, x, w, fast.mean, fast.invstd, training=training)
    want = reference_backward(
        grad.double().cpu().numpy(), x.double().cpu().numpy(), None if w is None else w.double().cpu().numpy(),
        fast.mean.double().cpu().numpy(), fast.invstd.double().cpu().numpy(), training=training,
    )  # fmt: skip
    for f, a, e in zip(fast_grads, pure_grads, want, strict=True):
        assert f.dtype == a.dtype and f.shape == a.shape
        assert max_error(f.cpu().numpy(), a.cpu().numpy()) <= tol
        assert max_error(f.cpu().numpy(), e) <= tol


@pytest.mark.parametrize(("offset", "spread"), [(1e4, 0.1), (1e6, 1.0), (20.0, 1.0), (0.0, 1e20), (0.0, 3e37)])
def test_hard_data_is_handed_to_the_shared_algorithm(spy, offset, spread):
    """Offsets beyond NATIVE_MEAN_OVER_STD standard deviations, and data whose squares
    overflow: the native result is discarded, and the answer is as exact as NumPy's."""
    x_np = (offset + spread * np.random.default_rng(2).normal(size=(64, 3, 8, 8))).astype(np.float32)
    result = pbn.batch_norm(t(x_np, torch.float32), training=True)
    assert spy == [False]
    expected = reference_batch_norm(x_np.astype(np.float64), training=True)["output"]
    assert max_error(result.output.cpu().numpy(), expected) <= tolerance("float32")
    np.testing.assert_allclose(result.output.cpu().numpy(), pbn.batch_norm(x_np, training=True).output, atol=2e-6)


def test_native_kernel_alone_would_fail_the_hard_data():
    """The reason for the hand-over: PyTorch's own kernel on offset data."""
    x_np = (1e4 + 0.1 * np.random.default_rng(2).normal(size=(64, 3, 8, 8))).astype(np.float32)
    native = torch.nn.functional.batch_norm(t(x_np, torch.float32), None, None, training=True)
    expected = reference_batch_norm(x_np.astype(np.float64), training=True)["output"]
    assert max_error(native.cpu().numpy(), expected) > 100 * tolerance("float32")


def test_eval_with_far_running_mean_is_handed_over(spy):
    """On the CPU (whose kernel computes x * alpha + beta); CUDA's kernels compute
    (x - mean) * invstd and keep such data, as exactly."""
    x_np = 1e4 + np.random.default_rng(3).normal(size=(32, 2, 9))
    x = t(x_np, torch.float32)
    rm, rv = t(np.array([1e4, 0.0]), torch.float32), t(np.array([1.0, 1.0]), torch.float32)
    fast, pure = both_paths(pbn.batch_norm, x, rm, rv, training=False)
    assert spy == [DEVICE != "cpu"]
    assert max_error(fast.output.cpu().numpy(), pure.output.cpu().numpy()) <= tolerance("float32")
    assert torch.equal(fast.invstd, pure.invstd)
    result = fast
    expected = reference_batch_norm(
        x.double().cpu().numpy(), rm.double().cpu().numpy(), rv.double().cpu().numpy(), training=False
    )
    assert max_error(result.output.cpu().numpy(), expected["output"]) <= tolerance("float32")


def test_constant_zero_and_nonfinite_channels(spy):
    x_np = np.random.default_rng(4).normal(size=(8, 4, 5))
    x_np[:, 1] = 0.0  # a dead channel: mean exactly 0, kept native
    bias = t(np.arange(4.0), torch.float32)
    x = t(x_np, torch.float32)
    fast, pure = both_paths(pbn.batch_norm, x, bias=bias, training=True)
    assert spy == [True]
    assert torch.equal(fast.output[:, 1], torch.full_like(fast.output[:, 1], 1.0))
    assert max_error(fast.output.cpu().numpy(), pure.output.cpu().numpy()) <= tolerance("float32")
    x_np[:, 2] = 7.25  # a constant channel: handed over, output exactly the bias
    fast = pbn.batch_norm(t(x_np, torch.float32), bias=bias, training=True)
    assert spy[-1] is False
    assert torch.equal(fast.output[:, 2], torch.full_like(fast.output[:, 2], 2.0))
    x_np[0, 3, 0] = np.nan
    fast, pure = both_paths(pbn.batch_norm, t(x_np, torch.float32), bias=bias, training=True)
    assert spy[-1] is False
    assert torch.equal(torch.isnan(fast.output), torch.isnan(pure.output))
    assert max_error(fast.output[:, :3].cpu().numpy(), pure.output[:, :3].cpu().numpy()) <= tolerance("float32")


def test_paths_not_taken(spy):
    """Half dtypes, channel axis other than 1, the meta device, running statistics that
    require grad: the shared algorithm runs. A module's cumulative factor (momentum=None)
    takes the kernel: the running update is the shared code's either way."""
    x = t(benign((6, 3, 5), seed=5), torch.float32)
    pbn.batch_norm(x, training=True)
    assert spy == [True]
    pbn.batch_norm(x, torch.zeros(3, device=DEVICE, requires_grad=True), torch.ones(3, device=DEVICE), training=True)
    assert spy == [True]
    pbn.batch_norm(x.detach().to(torch.bfloat16), training=True)
    pbn.batch_norm(x.detach().movedim(1, -1), training=True, axis=-1)
    pbn.batch_norm(x.detach().to("meta"), training=True)
    assert spy == [True]
    module = pbn.BatchNorm1d(3, momentum=None, xp=torch, device=DEVICE)
    module(x.detach())
    module(x.detach() + 1.0)
    assert spy == [True, True, True]
    reference = torch.nn.BatchNorm1d(3, momentum=None, device=DEVICE)
    reference(x.detach())
    reference(x.detach() + 1.0)
    assert max_error(module.running_var.detach().cpu().numpy(), reference.running_var.cpu().numpy()) <= tolerance(
        "float32"
    )


def test_non_contiguous_input(spy):
    x_np = benign((8, 3, 6, 5), seed=6)
    x = t(x_np, torch.float64).contiguous(memory_format=torch.channels_last)
    strided = t(x_np, torch.float64)[:, :, ::2]
    for value in (x, strided):
        fast, pure = both_paths(pbn.batch_norm, value, training=True)
        assert max_error(fast.output.cpu().numpy(), pure.output.cpu().numpy()) <= tolerance("float64")
    assert spy == [True, True]


def test_module_training_loop_uses_the_native_path(spy):
    """A torch module in a no-grad training loop (e.g. statistics recalibration)."""
    x_np = benign((16, 4, 6), seed=7)
    ours = pbn.BatchNorm1d(4, xp=torch, device=DEVICE, dtype=torch.float64)
    theirs = torch.nn.BatchNorm1d(4, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        for step in range(3):
            x = t(x_np + step, torch.float64)
            out, expected = ours(x), theirs(x)
            assert max_error(out.cpu().numpy(), expected.cpu().numpy()) <= tolerance("float64")
    assert spy == [True] * 3
    assert max_error(ours.running_var.cpu().numpy(), theirs.running_var.cpu().numpy()) <= tolerance("float64")
    assert int(ours.num_batches_tracked) == 3


def test_small_eval_takes_the_pure_path(spy, monkeypatch):
    """CPU only: on CUDA every eval call takes the kernel (launches cost more than passes)."""
    monkeypatch.setattr(torch_backend, "MIN_EVAL_ELEMENTS", 1 << 16)
    x = t(benign((4, 3, 5), seed=8), torch.float32)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    pbn.batch_norm(x, rm, rv, training=False)
    assert spy == ([] if DEVICE == "cpu" else [True])
    big = t(benign((64, 4, 256), seed=9), torch.float32)
    fast, pure = both_paths(
        pbn.batch_norm, big, torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE), training=False
    )
    assert spy == ([True] if DEVICE == "cpu" else [True, True])
    assert max_error(fast.output.cpu().numpy(), pure.output.cpu().numpy()) <= tolerance("float32")


@pytest.mark.parametrize("training", [True, False])
def test_autograd_through_the_native_path(spy, training):
    """Gradients of a loss that uses the output, mean and invstd: native path ==
    pure path, and gradcheck/gradgradcheck pass through the native path."""
    x_np = benign((5, 3, 4), seed=13)
    rng = np.random.default_rng(14)
    rm, rv = t(rng.uniform(-1, 1, 3), torch.float64), t(rng.uniform(0.5, 2, 3), torch.float64)
    upstream = [t(rng.normal(size=shape), torch.float64) for shape in ((5, 3, 4), (3,), (3,))]

    def loss_and_grads():
        x = t(x_np, torch.float64).requires_grad_()
        w = t(np.linspace(0.5, 2, 3), torch.float64).requires_grad_()
        b = t(np.linspace(-1, 1, 3), torch.float64).requires_grad_()
        r = pbn.batch_norm(x, rm, rv, w, b, training=training)
        loss = sum((value * weight).sum() for value, weight in zip((r.output, r.mean, r.invstd), upstream, strict=True))
        return torch.autograd.grad(loss, (x, w, b))

    fast, pure = both_paths(loss_and_grads)
    assert spy == [True]
    for f, a in zip(fast, pure, strict=True):
        assert max_error(f.cpu().numpy(), a.cpu().numpy()) <= tolerance("float64")

    def call(x, w, b):
        r = pbn.batch_norm(x, rm, rv, w, b, training=training)
        return r.output, r.mean, r.invstd

    x = t(x_np, torch.float64).requires_grad_()
    w = t(np.linspace(0.5, 2, 3), torch.float64).requires_grad_()
    b = t(np.linspace(-1, 1, 3), torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(call, (x, w, b), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(call, (x, w, b), eps=1e-6, atol=1e-7)
    assert all(spy)


def test_backward_with_a_graph_takes_the_shared_algorithm():
    """batch_norm_backward's own derivative treats mean and invstd as inputs; the
    native kernel's would not, so a recorded call stays on the shared algorithm."""
    from portable_bn._recipe import make_recipe

    x = t(benign((6, 3, 5), seed=15), torch.float64)
    r = pbn.batch_norm(x, training=True)
    grad = t(np.random.default_rng(16).normal(size=(6, 3, 5)), torch.float64)
    kernels, recipe = torch_backend.TorchKernels(), make_recipe((6, 3, 5), 1)
    assert kernels.serves_backward(grad, x, None, r.mean, r.invstd, recipe, training=True)
    x_graph = x.clone().requires_grad_()
    assert not kernels.serves_backward(grad, x_graph, None, r.mean, r.invstd, recipe, training=True)
    grad_input = pbn.batch_norm_backward(grad, x_graph, None, r.mean, r.invstd)[0]
    assert grad_input.grad_fn is not None
    with torch.no_grad():
        expected = pbn.batch_norm_backward(grad, x, None, r.mean, r.invstd)[0]
    assert max_error(grad_input.detach().cpu().numpy(), expected.cpu().numpy()) <= tolerance("float64")


@pytest.mark.parametrize("training", [True, False])
def test_cuda_graph_capture(spy, device, training):
    """Under CUDA graph capture the training verdict (a host read) is skipped and the
    shared algorithm, which never synchronizes there, is captured; eval keeps the kernel.
    Replays on new data give the reference results. (tests/test_triton_route.py captures the
    Triton kernels.)"""
    if device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    shape = (8, 3, 5, 4)
    x = t(benign(shape, seed=17), torch.float32)
    rm, rv = t(np.linspace(-1, 1, 3), torch.float32), t(np.linspace(0.5, 2, 3), torch.float32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
        pbn.batch_norm(x, rm, rv, training=training)
    torch.cuda.current_stream().wait_stream(side)
    assert spy == [True]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = pbn.batch_norm(x, rm, rv, training=training)
    assert spy == [True, not training]
    for seed in (18, 19):
        x.copy_(t(benign(shape, seed=seed), torch.float32))
        graph.replay()
        torch.cuda.synchronize()
        expected = reference_batch_norm(
            x.double().cpu().numpy(), rm.double().cpu().numpy(), rv.double().cpu().numpy(), training=training
        )
        for name in ("output", "running_mean", "running_var", "mean", "invstd"):
            assert max_error(getattr(captured, name).cpu().numpy(), expected[name]) <= tolerance("float32"), name
