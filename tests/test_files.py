"""pbn.save / pbn.load: every format on every backend, PyTorch checkpoints, and no unpickling."""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest

import portable_bn as pbn
from conftest import require_backend
from portable_bn._compat import array_namespace, device
from portable_bn.testing import max_error, sample, tolerance

FORMATS = [".npz", ".safetensors", ".pt"]


def _writable(suffix):
    """Skip a format whose library is missing (safetensors, torch are extras)."""
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    if suffix in (".pt", ".pth"):
        pytest.importorskip("torch")


def _random(shape, seed):
    return np.random.default_rng(seed).normal(1.0, 3.0, size=shape)


def _trained(vcombo, seed=0):
    module = pbn.BatchNorm2d(3, momentum=0.3, xp=vcombo.library, device=vcombo.device, dtype=vcombo.param_dtype)
    for step in range(2):
        module(vcombo.asarray(sample((4, 3, 2, 2), seed=seed + step)))
    return module


@pytest.mark.parametrize("suffix", FORMATS)
def test_module_round_trip_is_bit_exact(vcombo, suffix, tmp_path):
    _writable(suffix)
    source = _trained(vcombo)
    path = tmp_path / f"bn{suffix}"
    pbn.save(source, path)
    state = pbn.load(path, xp=vcombo.library, device=vcombo.device)
    assert list(state) == list(source.state_dict())
    target = pbn.BatchNorm2d(3, xp=vcombo.library, device=vcombo.device, dtype=vcombo.param_dtype)
    target.load_state_dict(state)
    for key, expected in source.state_dict().items():
        got = getattr(target, key)
        loaded = state[key]
        assert array_namespace(loaded) is array_namespace(expected), key
        assert device(loaded) == device(expected), key
        assert loaded.dtype == expected.dtype and tuple(loaded.shape) == tuple(expected.shape), key
        np.testing.assert_array_equal(vcombo.to_numpy(got), vcombo.to_numpy(expected), err_msg=key)
    assert tuple(state["num_batches_tracked"].shape) == ()
    assert int(vcombo.to_numpy(target.num_batches_tracked)) == 2


@pytest.mark.parametrize("suffix", FORMATS)
def test_whole_model_keys_and_input_dtypes_survive(vcombo, suffix, tmp_path):
    """Dotted keys in the saved order; arrays in the backend's dtype (float16, bfloat16 too)
    and the 0-d integer counter keep dtype and shape; bfloat16 is refused by .npz only."""
    _writable(suffix)
    counter = pbn.BatchNorm1d(2, xp=vcombo.library, device=vcombo.device, dtype=vcombo.param_dtype).num_batches_tracked
    data = {
        "layer1.0.bn1.weight": _random((3,), seed=1),
        "layer1.0.conv1.weight": sample((3, 2, 3, 3), seed=2),
        "fc.bias": _random((5,), seed=3),
    }
    state = {key: vcombo.asarray(value) for key, value in data.items()}
    state["layer1.0.bn1.num_batches_tracked"] = counter
    path = tmp_path / f"model{suffix}"
    if suffix == ".npz" and vcombo.dtype_name == "bfloat16":
        with pytest.raises(ValueError, match=r"layer1\.0\.bn1\.weight.*bfloat16.*\.safetensors"):
            pbn.save(state, path)
        assert not path.exists() and list(tmp_path.iterdir()) == []
        return
    pbn.save(state, path)
    loaded = pbn.load(path, xp=vcombo.library, device=vcombo.device)
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype, key
        assert device(loaded[key]) == device(value), key
        np.testing.assert_array_equal(vcombo.to_numpy(loaded[key]), vcombo.to_numpy(value), err_msg=key)
    assert tuple(loaded["layer1.0.bn1.num_batches_tracked"].shape) == ()


@pytest.mark.parametrize("suffix", FORMATS)
def test_numpy_file_loads_into_every_backend(vcombo, suffix, tmp_path):
    """A float64/int64 file lands in the library's own dtypes: float64 where it has it, else
    (JAX without 64-bit types) float32 and int32, without a warning."""
    _writable(suffix)
    state = {"running_mean": _random((4,), seed=4), "num_batches_tracked": np.array(9)}
    pbn.save(state, tmp_path / f"s{suffix}")
    loaded = pbn.load(tmp_path / f"s{suffix}", xp=vcombo.library, device=vcombo.device)
    probe = vcombo.asarray(np.zeros(1))
    assert array_namespace(loaded["running_mean"]) is array_namespace(probe)
    expected = state["running_mean"]
    if vcombo.backend == "jax_x32":
        assert loaded["running_mean"].dtype == vcombo.library.float32
        expected = expected.astype(np.float32)
    else:
        assert str(loaded["running_mean"].dtype).endswith("float64")
    np.testing.assert_array_equal(vcombo.to_numpy(loaded["running_mean"]), expected)
    assert int(vcombo.to_numpy(loaded["num_batches_tracked"])) == 9


def test_default_library_is_numpy(tmp_path):
    pbn.save({"x": np.arange(3.0)}, tmp_path / "x.npz")
    loaded = pbn.load(str(tmp_path / "x.npz"))
    assert type(loaded) is dict and isinstance(loaded["x"], np.ndarray)


def test_torch_checkpoint_loads_into_a_module_of_any_library(tmp_path):
    """``torch.save(model.state_dict())`` -> pbn.load -> load_state_dict(prefix=...) gives
    the torch module's eval output."""
    require_backend("torch")
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3, momentum=0.5))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-1.0, 1.0)
    model.train()
    for seed in range(3):
        model(torch.as_tensor(sample((4, 2, 5, 5), seed=seed), dtype=torch.float32))
    model.eval()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    x = sample((2, 3, 4, 4), seed=9).astype(np.float32)
    with torch.no_grad():
        expected = model[1](torch.as_tensor(x)).numpy()
    for xp in (np, torch):
        bn = pbn.BatchNorm2d(3, xp=xp).eval()
        bn.load_state_dict(pbn.load(tmp_path / "m.pt", xp=xp), prefix="1.")
        out = bn(xp.asarray(x))
        got = out.detach().numpy() if xp is torch else out
        assert max_error(got, expected) <= tolerance("float32")
        assert int(bn.num_batches_tracked) == 3


def test_files_written_here_open_in_torch_and_safetensors(tmp_path):
    require_backend("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import torch

    torch_bn = torch.nn.BatchNorm1d(3)
    for seed in range(2):
        torch_bn(torch.as_tensor(sample((5, 3), seed=seed), dtype=torch.float32))
    bn = pbn.BatchNorm1d(3, xp=np)
    bn.load_state_dict(torch_bn.state_dict())
    pbn.save(bn, tmp_path / "bn.pth")
    pbn.save(bn, tmp_path / "bn.safetensors")
    for state in (
        torch.load(tmp_path / "bn.pth", weights_only=True),
        safetensors_torch.load_file(tmp_path / "bn.safetensors"),
    ):
        fresh = torch.nn.BatchNorm1d(3)
        fresh.load_state_dict(state)
        for key, value in torch_bn.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), key
        assert state["num_batches_tracked"].shape == () and state["num_batches_tracked"].dtype == torch.int64


class _Payload:
    """A pickle whose loading calls os.mkdir(marker): proof that something ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_object_arrays_in_npz_are_refused_and_run_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(marker)
    np.savez(path, weight=np.ones(2), evil=payload)
    with pytest.raises(ValueError, match=r"pickled \(object\) data.*refused"):
        pbn.load(path)
    assert not marker.exists()
    with np.load(path, allow_pickle=True) as unsafe:  # the control: the payload is live
        unsafe["evil"]
    assert marker.exists()


def test_malicious_torch_checkpoint_is_refused_and_runs_nothing(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "evil": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"weights_only=True\) refused it.*nothing in it was run"):
        pbn.load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: the payload is live
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_a_raw_pickle_under_another_name_is_refused(tmp_path, suffix):
    _writable(suffix)
    marker = tmp_path / "ran"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    with pytest.raises(ValueError, match=r"pickled|refused"):
        pbn.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt", ".pth"])
def test_truncated_and_garbage_files_are_clear_errors(tmp_path, suffix):
    _writable(suffix)
    path = tmp_path / f"bn{suffix}"
    pbn.save(pbn.BatchNorm2d(4, xp=np), path)
    whole = path.read_bytes()
    for content in (whole[: len(whole) // 2], whole[:5], b"", np.random.default_rng(0).bytes(300)):
        path.write_bytes(content)
        with pytest.raises(ValueError, match=rf"cannot read .*bn\{suffix}"):
            pbn.load(path)


def test_torch_checkpoints_must_be_flat_state_dicts(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"state_dict": {"weight": torch.ones(2)}, "epoch": 3}, tmp_path / "nested.pt")
    with pytest.raises(ValueError, match=r"entry 'state_dict' is a dict, not a tensor.*flat state dicts"):
        pbn.load(tmp_path / "nested.pt")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        pbn.load(tmp_path / "list.pt")


def test_unknown_suffix_and_bad_paths(tmp_path):
    for call in (lambda p: pbn.save({"x": np.ones(1)}, p), pbn.load):
        with pytest.raises(ValueError, match=r"path must end in one of \.npz, \.safetensors, \.pt, \.pth, got"):
            call(tmp_path / "bn.h5")
        with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike, got int"):
            call(3)
    with pytest.raises(FileNotFoundError):
        pbn.load(tmp_path / "missing.npz")


def test_bad_state_dicts_are_refused_and_leave_the_file_alone(tmp_path):
    path = tmp_path / "bn.npz"
    pbn.save({"x": np.arange(3.0)}, path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"state_dict\['y'\] must be an array"):
        pbn.save({"x": np.ones(2), "y": object()}, path)
    with pytest.raises(TypeError, match="keys must be str, got int 3"):
        pbn.save({3: np.ones(2)}, path)
    with pytest.raises(ValueError, match=r"state_dict\['z'\] has dtype complex128"):
        pbn.save({"z": np.ones(2, dtype=complex)}, path)
    with pytest.raises(TypeError, match=r"module_or_state_dict must be a module .* got list"):
        pbn.save([np.ones(2)], path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn.npz"]  # no temporary file left


def test_arrays_without_data_are_refused(tmp_path):
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"state_dict\['weight'\] cannot be copied to the host"):
        pbn.save({"weight": torch.ones(2, device="meta")}, tmp_path / "bn.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_existing_file(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    path = tmp_path / "bn.pt"
    pbn.save({"x": np.arange(3.0)}, path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        pbn.save({"x": np.ones(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bn.pt"]


def test_missing_safetensors_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(ImportError, match=r"pip install portable_bn\[safetensors\]"):
        pbn.save({"x": np.ones(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ImportError, match=r"pip install portable_bn\[safetensors\]"):
        pbn.load(tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_does_not_change_its_arguments(tmp_path):
    bn = pbn.BatchNorm1d(2, xp=np)
    bn(np.array([[1.0, 2.0], [3.0, 5.0]], dtype=np.float32))
    state = bn.state_dict()
    copies = {key: value.copy() for key, value in state.items()}
    pbn.save(state, tmp_path / "bn.npz")
    for key, value in state.items():
        np.testing.assert_array_equal(value, copies[key])
