"""Shape-only recipes, computed once per (shape, axis) and cached (as einops does)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache
from typing import NamedTuple

SAMPLE_SIZE = 64
"""Values per channel in the sample that guesses a shift for the statistics (see :func:`make_recipe`)."""


class Recipe(NamedTuple):
    """What a batch-norm call needs to know about the input's shape."""

    channel_axis: int
    """Channel axis, normalized to ``0 <= channel_axis < ndim``."""
    num_channels: int
    """C: the length of the channel axis."""
    reduce_axes: tuple[int, ...]
    """Every axis but the channel axis."""
    param_shape: tuple[int, ...]
    """Shape that broadcasts a per-channel vector against the input."""
    count_per_channel: int | None
    """n: elements per channel (numel / C); None where a size is symbolic (unknown until the
    graph runs: ONNX through ndonnx), and n is then an array computed from the data."""
    outer: int | None
    """A: elements before the channel axis; the input is an ``(A, C, B)`` array in C order."""
    inner: int | None
    """B: elements after the channel axis."""
    sample_index: tuple[slice, ...]
    """Index of at most :data:`SAMPLE_SIZE` values of every channel, a block at the start of
    the non-channel axes (the last axes first: one image's first rows, say)."""


@lru_cache(maxsize=256)
def make_recipe(shape: tuple[int | None, ...], axis: int) -> Recipe:
    """Build the recipe for an input of ``shape`` whose channel axis is ``axis``.

    ``axis`` must be already validated and the channel axis's size known; other sizes may be
    None (symbolic).
    """
    ndim = len(shape)
    channel_axis = axis % ndim
    num_channels = shape[channel_axis]
    assert num_channels is not None  # recipe_for's check
    reduce_axes = tuple(i for i in range(ndim) if i != channel_axis)
    param_shape = tuple(num_channels if i == channel_axis else 1 for i in range(ndim))
    sample_index = [slice(None)] * ndim
    budget = SAMPLE_SIZE
    for i in reversed(reduce_axes):
        size = shape[i]
        extent = budget if size is None else max(1, min(size, budget))  # a symbolic axis: at most budget
        sample_index[i] = slice(0, extent)
        budget //= extent
    return Recipe(
        channel_axis=channel_axis,
        num_channels=num_channels,
        reduce_axes=reduce_axes,
        param_shape=param_shape,
        count_per_channel=_product(shape[i] for i in reduce_axes),
        outer=_product(shape[:channel_axis]),
        inner=_product(shape[channel_axis + 1 :]),
        sample_index=tuple(sample_index),
    )


def _product(sizes: Iterable[int | None]) -> int | None:
    """The product of sizes, None if one is symbolic."""
    sizes = list(sizes)
    return None if None in sizes else math.prod(size for size in sizes if size is not None)
