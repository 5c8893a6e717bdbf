"""Shape-only recipes, computed once per (shape, axis) and cached (as einops does)."""

from __future__ import annotations

import math
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
    count_per_channel: int
    """n: elements per channel (numel / C)."""
    outer: int
    """A: elements before the channel axis; the input is an ``(A, C, B)`` array in C order."""
    inner: int
    """B: elements after the channel axis."""
    sample_index: tuple[slice, ...]
    """Index of at most :data:`SAMPLE_SIZE` values of every channel, a block at the start of
    the non-channel axes (the last axes first: one image's first rows, say)."""


@lru_cache(maxsize=256)
def make_recipe(shape: tuple[int, ...], axis: int) -> Recipe:
    """Build the recipe for an input of ``shape`` whose channel axis is ``axis``.

    ``shape`` must be fully known and ``axis`` already validated.
    """
    ndim = len(shape)
    channel_axis = axis % ndim
    reduce_axes = tuple(i for i in range(ndim) if i != channel_axis)
    param_shape = tuple(shape[i] if i == channel_axis else 1 for i in range(ndim))
    count_per_channel = math.prod(shape[i] for i in reduce_axes)
    sample_index = [slice(None)] * ndim
    budget = SAMPLE_SIZE
    for i in reversed(reduce_axes):
        extent = max(1, min(shape[i], budget))
        sample_index[i] = slice(0, extent)
        budget //= extent
    return Recipe(
        channel_axis=channel_axis,
        num_channels=shape[channel_axis],
        reduce_axes=reduce_axes,
        param_shape=param_shape,
        count_per_channel=count_per_channel,
        outer=math.prod(shape[:channel_axis]),
        inner=math.prod(shape[channel_axis + 1 :]),
        sample_index=tuple(sample_index),
    )
