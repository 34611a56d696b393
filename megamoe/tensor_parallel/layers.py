"""Column- and row-parallel linear layers (Megatron's pair), with optional sequence parallelism.

A column-parallel layer splits its output features across the tp group; a row-parallel layer splits its input
features, so a column layer followed by a row layer (attention's qkv/proj, the MLP's fc1/fc2) needs one reduction
in forward and one in backward:

    no SP:  x [s, b, h] -copy_to-> column -> [s, b, f/tp] -> ... -> row -> partial [s, b, h] -reduce_from-> [s, b, h]
    SP:     x [s/tp, b, h] -all-gather-> column -> ... -> row -> partial [s, b, h] -reduce-scatter-> [s/tp, b, h]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.parallel import regions
from megamoe.parallel.group import AxisGroup
from megamoe.tensor_parallel.params import ParamSpec, new_param


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split across the tp group.

    Args:
        in_features, out_features: global sizes.
        tp_group: the group the output features are split over.
        sequence_parallel: input arrives as [s/tp, b, h] and is all-gathered along the sequence first.
        bias: add a bias (split like the output).
        gather_output: all-gather the output features (otherwise each rank keeps [.., out/tp]).
        std: init std of W.
        chunks: the output is a concatenation of `chunks` blocks each split across tp (SwiGLU's [gate; up]).
        skip_weight: own no weight; forward() is given one (an output layer tied to the word embedding).
    """

    def __init__(self, in_features: int, out_features: int, tp_group: AxisGroup, *, sequence_parallel: bool = False,
                 bias: bool = True, gather_output: bool = False, std: float = 0.02, chunks: int = 1,
                 skip_weight: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        tp = tp_group.size
        self.tp_group, self.sequence_parallel, self.gather_output = tp_group, sequence_parallel, gather_output
        shard = dict(shard_dim=0, shard_index=tp_group.index, shard_count=tp, chunks=chunks)
        self.weight = (None if skip_weight
                       else new_param(ParamSpec((out_features, in_features), std=std, **shard), device, dtype))
        self.bias = new_param(ParamSpec((out_features,), init="zeros", **shard), device, dtype) if bias else None

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """x: [s(/tp), b, in] -> [s, b, out/tp] (or [s, b, out] with gather_output). `weight` overrides W (tied)."""
        if self.sequence_parallel:
            x = regions.gather_from_sp_region(x, self.tp_group)
        else:
            x = regions.copy_to_tp_region(x, self.tp_group)
        y = F.linear(x, self.weight if weight is None else weight, self.bias)
        return regions.gather_from_tp_region(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split across the tp group; x arrives already split.

    The partial products are summed over the group (reduce-scattered along the sequence under SP); the bias is
    added once, after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, tp_group: AxisGroup, *, sequence_parallel: bool = False,
                 bias: bool = True, std: float = 0.02, device=None, dtype=None) -> None:
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.weight = new_param(ParamSpec((out_features, in_features), shard_dim=1, shard_index=tp_group.index,
                                          shard_count=tp_group.size, std=std), device, dtype)
        self.bias = (new_param(ParamSpec((out_features,), init="zeros", sequence_parallel=sequence_parallel),
                               device, dtype) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [s, b, in/tp] -> [s, b, out] (or [s/tp, b, out] under SP)."""
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = regions.reduce_scatter_to_sp_region(partial, self.tp_group)
        else:
            y = regions.reduce_from_tp_region(partial, self.tp_group)
        return y + self.bias if self.bias is not None else y
