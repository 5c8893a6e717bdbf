"""The one dispatch point: which primitive set serves a call.

A backend module of :mod:`._backends` is looked up by the array namespace's name and imported
on first use; it imports its library, which is then already imported (the caller holds one of
its arrays), so ``import portable_bn`` imports no array library. Inputs with no values per
channel, and calls inside :func:`pure_primitives`, get the pure array-API primitives.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from types import ModuleType
from typing import Any

from ._primitives import Primitives
from ._recipe import Recipe

_BACKEND_MODULES = {
    "array_api_compat.numpy": "numpy",
    "array_api_compat.torch": "torch",
    "jax.numpy": "jax",
    "array_api_compat.cupy": "cupy",
}
"""Namespace name -> module of :mod:`._backends`. Dask and array-api-strict have none: their
arrays run the pure primitives (Dask's own graph optimizer fuses the elementwise work)."""

_pure_only: ContextVar[bool] = ContextVar("portable_bn_pure_primitives", default=False)
_chooser: dict[str, Callable[[ModuleType, Any], Primitives]] = {}
_pure: dict[str, Primitives] = {}


@contextlib.contextmanager
def pure_primitives() -> Iterator[None]:
    """Run portable_bn on the pure array-API primitives alone, within this context.

    Within it (per thread and per asyncio task), every call uses the pure array-API
    primitives, no native kernel and no value-dependent route: the algorithm as a lazy or
    remote library runs it. The suite compares every backend's results with these.

    Yields
    ------
    None
        Nothing: a context.

    Examples
    --------
    >>> import numpy as np
    >>> import portable_bn as pbn
    >>> from portable_bn.testing import max_error, pure_primitives
    >>> x = np.random.default_rng(0).normal(size=(64, 8, 32)).astype(np.float32)
    >>> accelerated = pbn.batch_norm(x, training=True).output
    >>> with pure_primitives():
    ...     pure = pbn.batch_norm(x, training=True).output
    >>> max_error(accelerated, pure) < 1e-6
    True
    """
    token = _pure_only.set(True)
    try:
        yield
    finally:
        _pure_only.reset(token)


def pure(xp: ModuleType) -> Primitives:
    """The pure primitive set for ``xp``."""
    found = _pure.get(xp.__name__)
    if found is None or found.xp is not xp:
        found = _pure[xp.__name__] = Primitives(xp)
    return found


def primitives(xp: ModuleType, x: Any, recipe: Recipe) -> Primitives:
    """The primitive set for a call on ``x`` (an array of ``xp``) of shape ``recipe``."""
    if recipe.count_per_channel == 0 or _pure_only.get():
        return pure(xp)
    name = xp.__name__
    choose = _chooser.get(name)
    if choose is None:
        module = _BACKEND_MODULES.get(name)
        if module is None:
            return pure(xp)
        choose = _chooser[name] = importlib.import_module(f"._backends.{module}", __package__).primitives_for
    return choose(xp, x)
