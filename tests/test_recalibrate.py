"""pbn.recalibrate: torch.optim.swa_utils.update_bn's statistics, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import portable_bn as pbn
from conftest import require_backend
from portable_bn.testing import max_error, sample, tolerance

SHAPES = [(4, 3, 2, 2), (6, 3, 2, 2), (3, 3, 2, 2)]


def _module(vcombo, **options):
    bn = pbn.BatchNorm2d(3, xp=vcombo.library, device=vcombo.device, dtype=vcombo.param_dtype, **options)
    bn(vcombo.asarray(sample((5, 3, 2, 2), seed=99)))  # statistics to be replaced
    return bn


def _batches(vcombo):
    return [vcombo.asarray(sample(shape, seed=i) * (i + 1)) for i, shape in enumerate(SHAPES)]


def _expected(vcombo, batches):
    """The exact cumulative average in float64: mean of the batch means and of the unbiased variances."""
    hosts = [vcombo.to_numpy(b) for b in batches]
    means = [h.mean(axis=(0, 2, 3)) for h in hosts]
    variances = [h.var(axis=(0, 2, 3), ddof=1) for h in hosts]
    return np.mean(means, axis=0), np.mean(variances, axis=0)


def test_cumulative_average_on_every_backend(vcombo):
    bn = _module(vcombo, momentum=0.3)
    bn.eval()
    batches = _batches(vcombo)
    if vcombo.lazy:
        import dask

        def scheduler(*args, **kwargs):
            raise AssertionError("portable_bn triggered a Dask compute")

        with dask.config.set(scheduler=scheduler):
            pbn.recalibrate([bn], bn, batches, progress=False)
    else:
        pbn.recalibrate([bn], bn, batches, progress=False)
    mean, var = _expected(vcombo, batches)
    assert max_error(vcombo.to_numpy(bn.running_mean), mean) <= tolerance(vcombo.dtype_name)
    assert max_error(vcombo.to_numpy(bn.running_var), var) <= tolerance(vcombo.dtype_name)
    assert int(vcombo.to_numpy(bn.num_batches_tracked)) == len(batches)
    assert bn.momentum == 0.3 and bn.training is False
    assert bn.running_mean.dtype == vcombo.param_dtype


def test_several_modules_one_forward(vcombo):
    """Two modules in one model: the second sees the first's training output."""
    first, second = _module(vcombo), _module(vcombo, momentum=None)
    second.train()

    def forward(x):
        second(first(x) * 2.0 + 1.0)

    batches = _batches(vcombo)
    pbn.recalibrate([first, second], forward, iter(batches), progress=False)
    assert first.training is True and second.momentum is None and second.training is True
    # the second module saw the first one's normalized output: mean about 1, variance about 4
    mean = vcombo.to_numpy(second.running_mean)
    assert np.all(np.abs(mean - 1.0) < 1e-2)
    assert int(vcombo.to_numpy(second.num_batches_tracked)) == len(batches)


def test_equals_update_bn():
    """The same model in torch and with portable_bn modules: update_bn's running statistics."""
    require_backend("torch")
    import torch
    import torch.nn.functional as F
    from torch.optim.swa_utils import update_bn

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3),
        torch.nn.BatchNorm2d(4, momentum=0.2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 3, 3),
        torch.nn.BatchNorm2d(3),
    ).double()
    model(torch.as_tensor(sample((4, 2, 7, 7), seed=50)))  # statistics that update_bn replaces
    model.eval()
    bn1, bn2 = pbn.BatchNorm2d(4, xp=torch, dtype="float64"), pbn.BatchNorm2d(3, xp=torch, dtype="float64")
    bn1.load_state_dict(model.state_dict(), prefix="1.")
    bn2.load_state_dict(model.state_dict(), prefix="4.")
    bn2.eval()

    def forward(x):
        with torch.no_grad():
            h = bn1(F.conv2d(x, model[0].weight, model[0].bias))
            bn2(F.conv2d(F.relu(h), model[3].weight, model[3].bias))

    batches = [torch.as_tensor(sample((n, 2, 7, 7), seed=n) * n) for n in (3, 5, 4, 6)]
    update_bn(batches, model)
    pbn.recalibrate([bn1, bn2], forward, batches, progress=False)
    for ours, theirs in ((bn1, model[1]), (bn2, model[4])):
        for key in ("running_mean", "running_var"):
            np.testing.assert_allclose(getattr(ours, key).numpy(), getattr(theirs, key).numpy(), rtol=1e-12, atol=0)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == len(batches)
    assert bn1.momentum == 0.1 and bn1.training is True and bn2.training is False


def test_frozen_modules_are_recalibrated_and_frozen_again():
    bn = pbn.BatchNorm1d(2, xp=np, dtype=np.float64).freeze()
    batches = [sample((4, 2), seed=1), sample((6, 2), seed=2)]
    pbn.recalibrate([bn], bn, batches, progress=False)
    np.testing.assert_allclose(bn.running_mean, np.mean([b.mean(axis=0) for b in batches], axis=0), rtol=1e-14)
    assert bn.frozen is True and bn.training is True
    before = bn.running_mean
    bn(sample((3, 2), seed=3))
    assert bn.running_mean is before  # frozen again: updates nothing


def test_a_generator_and_progress(capsys):
    bn = pbn.BatchNorm1d(2, xp=np)
    pbn.recalibrate([bn], bn, (sample((4, 2), seed=i).astype(np.float32) for i in range(3)), progress=True)
    err = capsys.readouterr().err
    assert "recalibrate: 3 batches" in err and err.endswith("\n")
    assert int(bn.num_batches_tracked) == 3
    pbn.recalibrate([bn], bn, [sample((4, 2), seed=i).astype(np.float32) for i in range(3)], progress=True)
    assert "3/3 batches" in capsys.readouterr().err
    pbn.recalibrate([bn], bn, [sample((4, 2), seed=0).astype(np.float32)], progress=False)
    pbn.recalibrate([bn], bn, [sample((4, 2), seed=0).astype(np.float32)])  # auto: stderr is no terminal here
    assert capsys.readouterr().err == ""


def _snapshot(bn):
    return dict(vars(bn))


def _assert_unchanged(bn, snapshot):
    assert vars(bn).keys() == snapshot.keys()
    for key, value in snapshot.items():
        assert getattr(bn, key) is value, key


def test_an_exception_in_forward_restores_everything():
    bn = pbn.BatchNorm1d(2, momentum=0.3, xp=np).eval()
    other = pbn.BatchNorm1d(2, xp=np).freeze()
    bn(sample((4, 2), seed=0).astype(np.float32))
    snapshots = [_snapshot(bn), _snapshot(other)]
    calls = []

    def forward(x):
        calls.append(x)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        other(bn(x))

    batches = [sample((4, 2), seed=i).astype(np.float32) for i in range(3)]
    with pytest.raises(RuntimeError, match="out of memory"):
        pbn.recalibrate([bn, other], forward, batches, progress=False)
    assert len(calls) == 2
    _assert_unchanged(bn, snapshots[0])
    _assert_unchanged(other, snapshots[1])


def test_interrupts_restore_too():
    bn = pbn.BatchNorm1d(2, xp=np)
    snapshot = _snapshot(bn)

    def batches():
        yield sample((4, 2), seed=0).astype(np.float32)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pbn.recalibrate([bn], bn, batches(), progress=False)
    _assert_unchanged(bn, snapshot)


def test_empty_batches_and_idle_modules_are_errors_that_restore():
    bn, idle = pbn.BatchNorm1d(2, xp=np), pbn.BatchNorm1d(2, xp=np)
    snapshots = [_snapshot(bn), _snapshot(idle)]
    with pytest.raises(ValueError, match="batches is empty"):
        pbn.recalibrate([bn], bn, [], progress=False)
    with pytest.raises(ValueError, match=r"forward did not call modules\[2\]"):
        pbn.recalibrate([bn, bn, idle], bn, [sample((4, 2), seed=0).astype(np.float32)], progress=False)
    _assert_unchanged(bn, snapshots[0])
    _assert_unchanged(idle, snapshots[1])


def test_bad_arguments_are_clear_errors():
    bn = pbn.BatchNorm1d(2, xp=np)
    batches = [np.ones((2, 2), dtype=np.float32)]
    with pytest.raises(TypeError, match=r"got a single BatchNorm1d: pass \[module\]"):
        pbn.recalibrate(bn, bn, batches)
    with pytest.raises(TypeError, match=r"modules\[1\] must be a portable_bn BatchNorm.*got str"):
        pbn.recalibrate([bn, "bn2"], bn, batches)
    with pytest.raises(TypeError, match=r"modules must be a list.*got int"):
        pbn.recalibrate(3, bn, batches)
    with pytest.raises(ValueError, match=r"modules\[0\] has no running statistics"):
        pbn.recalibrate([pbn.BatchNorm1d(2, track_running_stats=False)], bn, batches)
    with pytest.raises(TypeError, match="forward must be callable"):
        pbn.recalibrate([bn], None, batches)
    with pytest.raises(TypeError, match="batches must be iterable, got float"):
        pbn.recalibrate([bn], bn, 1.0)
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        pbn.recalibrate([bn], bn, batches, progress="yes")
    assert int(bn.num_batches_tracked) == 0
