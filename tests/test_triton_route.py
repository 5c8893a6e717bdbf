"""The Triton kernels behind the public functions: PyTorch tensors take them, with the statistics
computed in one read and no verdict, and the results match the reference.

On a machine without a GPU the kernels run in Triton's interpreter on CPU tensors
(``PORTABLE_BN_TRITON=interpret``, ``TRITON_INTERPRET=1``); with a GPU, on CUDA tensors.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
pytest.importorskip("triton")

import portable_bn as pbn  # noqa: E402  (after the environment is set)
from conftest import require_backend  # noqa: E402
from portable_bn import _dispatch  # noqa: E402
from portable_bn._backends import torch as torch_backend  # noqa: E402
from portable_bn._compat import array_namespace  # noqa: E402
from portable_bn._recipe import make_recipe  # noqa: E402
from portable_bn.testing import HARD_DATA, max_error, reference_backward, reference_batch_norm, tolerance  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    require_backend("torch")
    if DEVICE == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set")
        monkeypatch.setenv(torch_backend.TRITON_SWITCH, "interpret")


def _tensor(array):
    return torch.from_numpy(np.ascontiguousarray(array)).to(DEVICE)


def _host(tensor):
    return tensor.detach().cpu().numpy()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(16, 3, 5, 7), (300, 4), (2, 3, 6000)])
def test_training_takes_the_kernels_and_matches_the_reference(shape, dtype):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * 3 + 1e3).astype(dtype)
    channels = shape[1]
    weight, bias = rng.normal(size=channels).astype(dtype), rng.normal(size=channels).astype(dtype)
    running = np.zeros(channels, dtype), np.ones(channels, dtype)
    args = [_tensor(a) for a in (x, *running, weight, bias)]
    prims = _dispatch.primitives(array_namespace(args[0]), args[0], make_recipe(shape, 1))
    assert prims.one_read(args[0]) and prims.accelerator == "triton"
    before = [a.clone() for a in args]
    result = pbn.batch_norm(*args, training=True)
    expected = reference_batch_norm(x, *running, weight, bias, training=True)
    tol = tolerance(dtype)
    for key in ("output", "running_mean", "running_var", "mean", "invstd"):
        assert max_error(_host(getattr(result, key)), expected[key]) <= tol, key
    grad = rng.normal(size=shape).astype(dtype)
    grads = pbn.batch_norm_backward(_tensor(grad), args[0], args[3], result.mean, result.invstd, training=True)
    want = reference_backward(grad, x, weight, _host(result.mean), _host(result.invstd), training=True)
    for got, expect in zip(grads, want, strict=True):
        assert max_error(_host(got), expect) <= tol
    for old, new in zip(before, args, strict=True):
        assert torch.equal(old, new)  # nothing written


@pytest.mark.parametrize("name", [n for n in HARD_DATA if "float64" in HARD_DATA[n][1]])
def test_hard_data_through_the_kernels(name):
    make, _ = HARD_DATA[name]
    x = make((8, 3, 4, 4), 7).astype(np.float64)
    with np.errstate(all="ignore"):  # the interpreter computes with NumPy
        result = pbn.batch_norm(_tensor(x), training=True)
    expected = reference_batch_norm(x, training=True)
    for key in ("output", "mean", "invstd"):
        assert max_error(_host(getattr(result, key)), expected[key]) <= tolerance("float64"), (name, key)


def test_autograd_and_the_switch_keep_pytorch_s_kernels(monkeypatch):
    x = _tensor(np.random.default_rng(1).normal(size=(4, 3, 5)).astype(np.float32))
    xp = array_namespace(x)
    prims = _dispatch.primitives(xp, x, make_recipe(tuple(x.shape), 1))
    assert prims.one_read(x)
    assert not prims.one_read(x.clone().requires_grad_(True))  # autograd records: PyTorch's kernels
    assert not prims.one_read(x[:, :, ::2])  # strided
    monkeypatch.setenv(torch_backend.TRITON_SWITCH, "0")
    assert not prims.one_read(x)


def test_no_host_synchronisation_and_cuda_graph_capture():
    """On a GPU: no call reads the device on the host (``set_sync_debug_mode("error")`` raises
    at the first synchronisation), and a training call is captured in a CUDA graph whose
    replays on new data give the reference results."""
    if DEVICE != "cuda":
        pytest.skip("needs a CUDA device")
    rng = np.random.default_rng(3)
    shape = (16, 8, 12, 12)
    x = _tensor(rng.normal(5.0, 2.0, size=shape).astype(np.float32))
    grad = _tensor(rng.normal(size=shape).astype(np.float32))
    rm, rv = _tensor(np.zeros(8, np.float32)), _tensor(np.ones(8, np.float32))
    w, b = _tensor(rng.normal(size=8).astype(np.float32)), _tensor(rng.normal(size=8).astype(np.float32))
    warm = pbn.batch_norm(x, rm, rv, w, b, training=True)  # compiles the kernels
    pbn.batch_norm_backward(grad, x, w, warm.mean, warm.invstd)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = pbn.batch_norm(x, rm, rv, w, b, training=True)
        pbn.batch_norm(x, result.running_mean, result.running_var, w, b, training=False)
        pbn.batch_norm_backward(grad, x, w, result.mean, result.invstd)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        pbn.batch_norm(x, rm, rv, w, b, training=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = pbn.batch_norm(x, rm, rv, w, b, training=True)
    for seed in (4, 5):
        data = np.random.default_rng(seed).normal(-3.0, 0.5, size=shape).astype(np.float32)
        x.copy_(_tensor(data))
        graph.replay()
        torch.cuda.synchronize()
        expected = reference_batch_norm(data, _host(rm), _host(rv), _host(w), _host(b), training=True)
        for key in ("output", "running_mean", "running_var", "mean", "invstd"):
            assert max_error(_host(getattr(captured, key)), expected[key]) <= tolerance("float32"), key
