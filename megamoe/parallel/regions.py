"""Autograd-aware communication regions for tensor, sequence and expert parallelism.

Each forward collective is paired with the collective its gradient needs (Megatron's "mappings"):

    function                      forward                          backward
    copy_to_tp_region             identity                         all-reduce
    reduce_from_tp_region         all-reduce                       identity
    scatter_to_tp_region          keep my slice of the last dim    all-gather along the last dim
    gather_from_tp_region         all-gather along the last dim    keep my slice
    scatter_to_sp_region          keep my slice of dim 0 (seq)     all-gather along dim 0
    gather_from_sp_region         all-gather along dim 0           reduce-scatter along dim 0 (or keep my slice)
    reduce_scatter_to_sp_region   reduce-scatter along dim 0       all-gather along dim 0
    all_to_all                    all-to-all with split sizes      all-to-all with the splits swapped

The group is an argument, so the same functions serve tp, etp, ep or cp groups. All traffic goes through comm.py.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megamoe.parallel import comm
from megamoe.parallel.group import AxisGroup


# Plain (non-autograd) helpers -------------------------------------------------------------------------------------
def split_along(x: torch.Tensor, group: AxisGroup, dim: int) -> torch.Tensor:
    """This member's contiguous 1/n slice of `x` along `dim`."""
    n = group.size
    if x.shape[dim] % n:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} evenly across {group.describe()}")
    return x.chunk(n, dim=dim)[group.index].contiguous()


def gather_along(x: torch.Tensor, group: AxisGroup, dim: int) -> torch.Tensor:
    """Concatenate every member's `x` along `dim`, in group order."""
    n = group.size
    if n == 1:
        return x
    x = x.contiguous()
    out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    comm.all_gather_into_tensor(out, x, group)
    if dim == 0 or dim == -x.dim():
        return out
    return torch.cat(out.chunk(n, dim=0), dim=dim)


def reduce_scatter_along_first(x: torch.Tensor, group: AxisGroup) -> torch.Tensor:
    """Sum `x` over the group and keep this member's 1/n slice of dim 0."""
    n = group.size
    if n == 1:
        return x
    if x.shape[0] % n:
        raise ValueError(f"cannot reduce-scatter dim 0 of size {x.shape[0]} evenly across {group.describe()}")
    out = torch.empty((x.shape[0] // n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    comm.reduce_scatter_tensor(out, x.contiguous(), group)
    return out


def all_reduced(x: torch.Tensor, group: AxisGroup) -> torch.Tensor:
    """A summed copy of `x` over the group (x itself is left untouched)."""
    if group.size == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    comm.all_reduce(out, group)
    return out


# Autograd functions ------------------------------------------------------------------------------------------------
class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduced(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduced(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return split_along(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return gather_along(grad, ctx.group, ctx.dim), None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, grad_reduce_scatter):
        ctx.group, ctx.dim, ctx.grad_reduce_scatter = group, dim, grad_reduce_scatter
        return gather_along(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_reduce_scatter:
            return reduce_scatter_along_first(grad, ctx.group), None, None, None
        return split_along(grad, ctx.group, ctx.dim), None, None, None


class _ReduceScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_along_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_along(grad, ctx.group, 0), None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return _all_to_all(x, group, output_splits, input_splits)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.input_splits, ctx.output_splits), None, None, None


def _all_to_all(x, group, output_splits, input_splits):
    if group.size == 1:
        return x
    rows = sum(output_splits) if output_splits is not None else x.shape[0]
    out = torch.empty((rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    comm.all_to_all_single(out, x.contiguous(), group, output_splits, input_splits)
    return out


# Public region functions -------------------------------------------------------------------------------------------
def copy_to_tp_region(x: torch.Tensor, group: AxisGroup) -> torch.Tensor:
    """Identity forward; gradients summed over the group (input of a column-parallel layer)."""
    return _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: AxisGroup) -> torch.Tensor:
    """Sum partial results over the group; gradient passes through (output of a row-parallel layer)."""
    return _ReduceFromRegion.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: AxisGroup) -> torch.Tensor:
    """Keep this member's slice of the last dim; gradients gathered back."""
    return _ScatterToRegion.apply(x, group, -1)


def gather_from_tp_region(x: torch.Tensor, group: AxisGroup) -> torch.Tensor:
    """Concatenate the members' last-dim slices; gradient sliced back."""
    return _GatherFromRegion.apply(x, group, -1, False)


def scatter_to_sp_region(x: torch.Tensor, group: AxisGroup) -> torch.Tensor:
    """[s, b, h] -> [s/n, b, h]: keep this member's sequence slice; gradients gathered back."""
    return _ScatterToRegion.apply(x, group, 0)


def gather_from_sp_region(x: torch.Tensor, group: AxisGroup, grad_reduce_scatter: bool = True) -> torch.Tensor:
    """[s/n, b, h] -> [s, b, h] by all-gather.

    The gradient is reduce-scattered when the consumer is tensor-parallel (each member holds a partial gradient of
    the whole sequence), or only sliced when every member already holds the full gradient.
    """
    return _GatherFromRegion.apply(x, group, 0, grad_reduce_scatter)


def reduce_scatter_to_sp_region(x: torch.Tensor, group: AxisGroup) -> torch.Tensor:
    """[s, b, h] partial sums -> [s/n, b, h] reduced slice; gradients all-gathered back."""
    return _ReduceScatterToRegion.apply(x, group)


def all_to_all(x: torch.Tensor, group: AxisGroup, output_splits: Sequence[int] | None = None,
               input_splits: Sequence[int] | None = None) -> torch.Tensor:
    """Exchange rows of `x` (dim 0) across the group; the backward pass sends gradients the opposite way."""
    out_s = list(output_splits) if output_splits is not None else None
    in_s = list(input_splits) if input_splits is not None else None
    return _AllToAll.apply(x, group, out_s, in_s)
