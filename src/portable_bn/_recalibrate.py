"""Recomputing running statistics over a set of batches (``torch.optim.swa_utils.update_bn``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from ._modules import _BatchNorm

__all__ = ["recalibrate"]


def recalibrate(
    modules: Iterable[Any], forward: Callable[[Any], Any], batches: Iterable[Any], *, progress: bool | None = None
) -> None:
    """Recompute the running statistics of ``modules`` as the exact average over ``batches``.

    What ``torch.optim.swa_utils.update_bn`` does, for the modules given: each module's
    running statistics are reset, its momentum set to None (the cumulative average) and
    it is put in training mode; ``forward(batch)`` runs once per batch (its return
    value is ignored); then each module gets back its momentum and mode. Afterwards
    ``running_mean`` is the mean of the batch means, ``running_var`` the mean of the
    (unbiased) batch variances, and ``num_batches_tracked`` counts the batches (the
    module's own counting: a virtual batch counts as one). Frozen modules are
    recalibrated too, since they are listed, and frozen again afterwards.

    If ``forward`` raises (or the iteration over ``batches`` does, or an interrupt
    arrives), every module is restored exactly as it was before the call, running
    statistics included, and the exception propagates.

    Parameters
    ----------
    modules : iterable of BatchNorm1d, BatchNorm2d or BatchNorm3d
        The modules to recalibrate, each with running statistics. Other layers are
        ``forward``'s business: put dropout and the like in the mode wanted
        (``update_bn`` puts the whole model in training mode).
    forward : callable
        ``forward(batch)`` runs the model on one batch, calling the modules.
    batches : iterable
        The batches, passed to ``forward`` unchanged; iterated once, so a generator
        will do.
    progress : bool or None, keyword-only
        A progress line on stderr: True shows it, False not, None shows it when
        stderr is a terminal. It counts batches, out of ``len(batches)`` where
        ``batches`` has a length.

    Raises
    ------
    TypeError
        ``modules`` is not an iterable of portable_bn modules (the message names the
        position of the first that is not one), ``forward`` is not callable,
        ``batches`` is not iterable, or ``progress`` is not a bool or None.
    ValueError
        A module has no running statistics (``track_running_stats=False``),
        ``batches`` is empty, or ``forward`` did not call some module in training
        mode; the modules are then restored as they were.

    Examples
    --------
    >>> import numpy as np
    >>> import portable_bn as pbn
    >>> bn = pbn.BatchNorm1d(2, xp=np, dtype=np.float64).eval()
    >>> batches = [np.array([[0.0, 1.0], [2.0, 3.0]]), np.array([[4.0, 5.0], [8.0, 5.0]])]
    >>> pbn.recalibrate([bn], bn, batches, progress=False)
    >>> bn.running_mean            # mean of the batch means (1, 2) and (6, 5)
    array([3.5, 3.5])
    >>> bn.running_var             # mean of the unbiased batch variances (2, 2) and (8, 0)
    array([5., 1.])
    >>> int(bn.num_batches_tracked), bn.training, bn.momentum
    (2, False, 0.1)
    """
    targets, positions = _checked_modules(modules)
    if not callable(forward):
        raise TypeError(f"forward must be callable, got {type(forward).__name__}")
    try:
        iterator = iter(batches)
    except TypeError:
        raise TypeError(f"batches must be iterable, got {type(batches).__name__}") from None
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {type(progress).__name__} {progress!r}")
    total = _length(batches)
    bar = _Progress(total) if (progress if progress is not None else _stderr_is_terminal()) else None

    saved = [dict(vars(module)) for module in targets]  # attributes are rebound, never written into
    frozen = [bool(getattr(module, "frozen", False)) for module in targets]
    try:
        for module, was_frozen in zip(targets, frozen, strict=True):
            if was_frozen:
                module.unfreeze()
            module.reset_running_stats()
            module.momentum = None
            module.train()
        before = [module.num_batches_tracked for module in targets]
        count = 0
        for batch in iterator:
            forward(batch)
            count += 1
            if bar is not None:
                bar.update(count)
        if count == 0:
            raise ValueError("batches is empty: there is nothing to compute the statistics from")
        idle = [positions[i] for i, module in enumerate(targets) if module.num_batches_tracked is before[i]]
        if idle:
            raise ValueError(
                f"forward did not call modules{idle} in training mode, so their statistics would stay reset; "
                "the modules are restored"
            )
    except BaseException:
        for module, state in zip(targets, saved, strict=True):
            module.__dict__.clear()
            module.__dict__.update(state)
        raise
    finally:
        if bar is not None:
            bar.close()
    for module, state, was_frozen in zip(targets, saved, frozen, strict=True):
        module.momentum = state["momentum"]
        module.train(state["training"])
        if was_frozen:
            module.freeze()


def _checked_modules(modules: Any) -> tuple[list[Any], list[int]]:
    """The distinct modules, and where each first appears in ``modules``."""
    if isinstance(modules, _BatchNorm):
        raise TypeError(f"modules must be a list of modules, got a single {type(modules).__name__}: pass [module]")
    try:
        items = list(modules)
    except TypeError:
        raise TypeError(f"modules must be a list (or iterable) of modules, got {type(modules).__name__}") from None
    unique: dict[int, tuple[Any, int]] = {}
    for i, module in enumerate(items):
        if not isinstance(module, _BatchNorm):
            raise TypeError(
                f"modules[{i}] must be a portable_bn BatchNorm1d, BatchNorm2d or BatchNorm3d, "
                f"got {type(module).__name__}"
            )
        if not module.track_running_stats:
            raise ValueError(f"modules[{i}] has no running statistics to recalibrate (track_running_stats=False)")
        unique.setdefault(id(module), (module, i))
    return [module for module, _ in unique.values()], [i for _, i in unique.values()]


def _length(batches: Any) -> int | None:
    try:
        return len(batches)
    except (TypeError, ValueError, NotImplementedError):
        return None


def _stderr_is_terminal() -> bool:
    stream = sys.stderr
    try:
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class _Progress:
    """A one-line progress display on stderr: ``recalibrate: 37/120 batches [#####.....]``,
    redrawn at most ten times a second, finished with a newline."""

    WIDTH = 30

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.count = 0
        self.last = 0.0
        self.stream: TextIO | None = sys.stderr

    def _line(self) -> str:
        if self.total:
            done = min(self.WIDTH, self.WIDTH * self.count // self.total)
            return f"\rrecalibrate: {self.count}/{self.total} batches [{'#' * done}{'.' * (self.WIDTH - done)}]"
        return f"\rrecalibrate: {self.count} batches"

    def _write(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text)
            self.stream.flush()

    def update(self, count: int) -> None:
        self.count = count
        now = time.monotonic()
        if now - self.last >= 0.1:
            self.last = now
            self._write(self._line())

    def close(self) -> None:
        self._write(self._line() + "\n")
