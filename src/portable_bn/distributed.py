"""Synchronized batch norm on the engines users already run.

``sync=`` of :func:`portable_bn.batch_norm`, :func:`portable_bn.batch_norm_backward` and the
modules takes a *reducer*: an object that makes per-channel numbers global across the replicas
of a data-parallel job. Statistics are merged from each replica's moments ``(count, mean, M2)``
weighted by its count, so replicas may hold different numbers of samples, none at all, or masks.

A reducer has three members, each a thin call into the engine's own collectives:

- ``gather(array)``: the arrays of every replica stacked, shape ``(R, *array.shape)``, the
  same on every replica, in replica order (one collective per statistics pass);
- ``sum(array)``: the elementwise sum over the replicas (one collective per backward);
- ``size``: R, the number of replicas.

Two adapters ship here; Dask needs none (a Dask array chunked along the batch is already the
global batch, and its graph runs on a ``dask.distributed`` cluster).
"""

from __future__ import annotations

from typing import Any

__all__ = ["JaxAxis", "TorchProcessGroup"]


class TorchProcessGroup:
    """A reducer over a ``torch.distributed`` process group.

    Works with every backend ``torch.distributed`` offers for the tensors' device: gloo on
    the CPU (which ``torch.nn.SyncBatchNorm`` refuses), NCCL on CUDA. The collectives are
    differentiable: autograd through :func:`portable_bn.batch_norm` or a module gives the
    synchronized backward (the gradient of a gathered value is summed over the replicas).

    Parameters
    ----------
    group : ProcessGroup or None
        The group to synchronize over; None is the default group
        (``torch.distributed.init_process_group`` must have run).

    Examples
    --------
    In each process, after ``torch.distributed.init_process_group`` (a complete script that
    starts its own processes: ``docs/examples/torch_sync.py``):

    >>> import portable_bn as pbn
    >>> from portable_bn.distributed import TorchProcessGroup
    >>> sync = TorchProcessGroup()          # the default group
    >>> sync
    TorchProcessGroup(group=None)
    >>> bn = pbn.BatchNorm2d(64, sync=sync)  # its training calls are synchronized
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group

    @property
    def size(self) -> int:
        """The number of processes in the group."""
        import torch.distributed as dist

        return int(dist.get_world_size(self.group))

    def gather(self, array: Any) -> Any:
        """Every process's ``array`` stacked in rank order: ``(size, *array.shape)``."""
        import torch

        if torch.is_grad_enabled() and array.requires_grad:
            return _differentiable("gather").apply(array, self.group)
        return _all_gather(array, self.group)

    def sum(self, array: Any) -> Any:
        """The sum of every process's ``array``."""
        import torch

        if torch.is_grad_enabled() and array.requires_grad:
            return _differentiable("sum").apply(array, self.group)
        return _all_reduce(array, self.group)

    def __repr__(self) -> str:
        return f"TorchProcessGroup(group={self.group!r})"


def _all_gather(array: Any, group: Any) -> Any:
    import torch
    import torch.distributed as dist

    array = array.detach().contiguous()
    parts = [torch.empty_like(array) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, array, group=group)
    return torch.stack(parts)


def _all_reduce(array: Any, group: Any) -> Any:
    import torch
    import torch.distributed as dist

    total = torch.clone(array.detach(), memory_format=torch.contiguous_format)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


_FUNCTIONS: dict[str, Any] = {}


def _differentiable(kind: str) -> Any:
    """The collective ``kind`` as a ``torch.autograd.Function`` (made on first use):

    - ``"gather"``: all-gather, whose backward sums the gradient of this process's slot over
      the processes;
    - ``"sum"``: all-reduce, whose backward is the all-reduce of the gradient."""
    if not _FUNCTIONS:
        import torch
        import torch.distributed as dist

        class _Gather(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, array: Any, group: Any) -> Any:
                ctx.group = group
                return _all_gather(array, group)

            @staticmethod
            def backward(ctx: Any, grad: Any) -> Any:
                return _all_reduce(grad, ctx.group)[dist.get_rank(ctx.group)], None

        class _Sum(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, array: Any, group: Any) -> Any:
                ctx.group = group
                return _all_reduce(array, group)

            @staticmethod
            def backward(ctx: Any, grad: Any) -> Any:
                return _all_reduce(grad, ctx.group), None

        _FUNCTIONS.update(gather=_Gather, sum=_Sum)
    return _FUNCTIONS[kind]


class JaxAxis:
    """A reducer over a named axis of ``jax.shard_map`` or ``jax.pmap``.

    Calls ``jax.lax.all_gather`` and ``jax.lax.psum`` over ``axis_name``, so it works inside
    the mapped function only; ``jax.grad`` differentiates through it.

    Parameters
    ----------
    axis_name : hashable
        The mapped axis the batch is split over.

    Examples
    --------
    Inside the function that ``jax.shard_map`` maps over a mesh axis ``"batch"`` (a complete
    script: ``docs/examples/jax_sync.py``):

    >>> import portable_bn as pbn
    >>> from portable_bn.distributed import JaxAxis
    >>> sync = JaxAxis("batch")
    >>> sync
    JaxAxis('batch')
    >>> def normalize(x, running_mean, running_var):
    ...     return pbn.batch_norm(x, running_mean, running_var, training=True, sync=sync)
    """

    def __init__(self, axis_name: Any) -> None:
        self.axis_name = axis_name

    @property
    def size(self) -> int:
        """The size of the mapped axis."""
        import jax

        return int(jax.lax.axis_size(self.axis_name))

    def gather(self, array: Any) -> Any:
        """Every replica's ``array`` stacked: ``(size, *array.shape)``.

        One ``psum`` of the array placed in its replica's row (zeros elsewhere: adding them is
        exact), whose result ``shard_map`` knows to be the same on every replica, so values
        computed from it may leave with ``out_specs=P()``."""
        import jax
        import jax.numpy as jnp

        rows = jnp.arange(self.size) == jax.lax.axis_index(self.axis_name)
        placed = jnp.where(jnp.reshape(rows, (-1,) + (1,) * array.ndim), array[None], jnp.zeros_like(array[None]))
        return jax.lax.psum(placed, self.axis_name)

    def sum(self, array: Any) -> Any:
        """The sum of every replica's ``array``."""
        import jax

        return jax.lax.psum(array, self.axis_name)

    def __repr__(self) -> str:
        return f"JaxAxis({self.axis_name!r})"
