"""The dense MLP: fc1 (column-parallel) -> GELU or SwiGLU -> fc2 (row-parallel)."""

from __future__ import annotations

import math

import torch
from torch import nn

from megamoe.model.config import ModelConfig
from megamoe.model.fused import mlp_activation
from megamoe.parallel.group import AxisGroup
from megamoe.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    """fc1 (column-parallel) -> GELU or SwiGLU -> fc2 (row-parallel). For SwiGLU fc1 holds [gate; up], each half
    split over tp, so every rank has the gate and up rows of the same hidden units."""

    def __init__(self, config: ModelConfig, tp_group: AxisGroup, sequence_parallel: bool, ffn_hidden_size: int,
                 device=None, dtype=None) -> None:
        super().__init__()
        c, self.swiglu = config, config.swiglu
        fc1_out = 2 * ffn_hidden_size if self.swiglu else ffn_hidden_size
        self.linear_fc1 = ColumnParallelLinear(c.hidden_size, fc1_out, tp_group, sequence_parallel=sequence_parallel,
                                               bias=c.add_bias_linear, std=c.init_method_std,
                                               chunks=2 if self.swiglu else 1, device=device, dtype=dtype)
        self.linear_fc2 = RowParallelLinear(ffn_hidden_size, c.hidden_size, tp_group,
                                            sequence_parallel=sequence_parallel, bias=c.add_bias_linear,
                                            std=c.init_method_std / math.sqrt(2 * c.num_layers),
                                            device=device, dtype=dtype)
        self.activation = mlp_activation(self.swiglu, c.torch_compile)

    def forward(self, x: torch.Tensor, dropout_ctx=None) -> torch.Tensor:
        """x: [s(/tp), b, h] -> same; dropout_ctx is unused (the MLP slot's signature, shared with MoE layers)."""
        return self.linear_fc2(self.activation(self.linear_fc1(x)))
