"""GroupedExperts: all of this rank's experts in one weight tensor per projection, run as one grouped GEMM.

Rows arrive sorted by local expert with host-side counts. Three interchangeable backends compute
y_e = act(x_e W1_e^T) W2_e^T for every expert e at once:
    "loop"          a Python loop of matmuls over the experts: the reference twin the others are tested against
    "torch"         torch._grouped_mm (CPU and CUDA in torch >= 2.8 for 16-byte-aligned shapes)
    "grouped_gemm"  the grouped_gemm package (CUDA only; imported only when present and on CUDA)
With expert-tensor parallelism each rank holds a slice of every expert's hidden units, so its output is a partial
sum that the dispatcher reduces over the etp group.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.model.config import ModelConfig
from megamoe.model.fused import mlp_activation
from megamoe.parallel.group import AxisGroup
from megamoe.tensor_parallel.params import ParamSpec, new_param

BACKENDS = ("loop", "torch", "grouped_gemm")


def available_backends(device: torch.device) -> list[str]:
    """The backends that can run on `device`, the reference loop first."""
    out = ["loop"]
    if hasattr(torch, "_grouped_mm"):
        out.append("torch")
    if device.type == "cuda" and importlib.util.find_spec("grouped_gemm") is not None:
        out.append("grouped_gemm")
    return out


def choose_backend(grouped_gemm: bool, device: torch.device, shapes: tuple[int, ...], dtype: torch.dtype) -> str:
    """--moe-grouped-gemm picks the fastest available grouped backend; otherwise (or if none fits) the loop."""
    if not grouped_gemm:
        return "loop"
    available = available_backends(device)
    if "grouped_gemm" in available:
        return "grouped_gemm"
    if "torch" in available and all(s * torch.finfo(dtype).bits // 8 % 16 == 0 for s in shapes):
        return "torch"
    return "loop"


class _GroupedLinear(torch.autograd.Function):
    """torch._grouped_mm with a backward that yields the weight gradient as [E, out, in], contiguous like the
    weight, so autograd stores it without a copy; the input gradient is one grouped GEMM, the weight gradient a
    2-D x 2-D grouped GEMM over each expert's rows."""

    @staticmethod
    def forward(ctx, x, weight, offsets):
        ctx.save_for_backward(x, weight, offsets)
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)   # [M, out]

    @staticmethod
    def backward(ctx, grad):
        x, weight, offsets = ctx.saved_tensors
        grad = grad.contiguous()  # e.g. an expanded gradient of .sum() has zero strides
        grad_x = torch._grouped_mm(grad, weight, offs=offsets) if ctx.needs_input_grad[0] else None
        grad_w = torch._grouped_mm(grad.t(), x, offs=offsets) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int], offsets: torch.Tensor,
                   backend: str) -> torch.Tensor:
    """Row block e of x (counts[e] rows) times weight[e]^T. x: [M, in]; weight: [E, out, in] -> [M, out]."""
    if backend == "loop":
        blocks = x.split(counts)
        return torch.cat([F.linear(block, weight[e]) for e, block in enumerate(blocks)])
    if backend == "torch":
        return _GroupedLinear.apply(x, weight, offsets)
    if backend == "grouped_gemm":
        from grouped_gemm import ops  # CUDA only; checked by available_backends

        return ops.gmm(x, weight, torch.tensor(counts, dtype=torch.int64), trans_b=True)
    raise ValueError(f"unknown grouped GEMM backend {backend!r}; choose from {BACKENDS}")


class _Weight(nn.Module):
    """A holder so parameters are named like Megatron-Core's: experts.linear_fc1.weight."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight


class GroupedExperts(nn.Module):
    """This rank's experts: fc1 [E_local, (2) ffn/etp, h] and fc2 [E_local, h, ffn/etp], SwiGLU or GELU."""

    def __init__(self, config: ModelConfig, ep_group: AxisGroup, etp_group: AxisGroup, device=None,
                 dtype=None) -> None:
        super().__init__()
        moe = config.moe
        self.num_local = moe.num_experts // ep_group.size
        self.swiglu = config.swiglu
        ffn, h = moe.ffn_hidden_size or config.ffn_hidden_size, config.hidden_size
        experts = (ep_group.index * self.num_local, self.num_local)
        etp = dict(shard_index=etp_group.index, shard_count=etp_group.size, experts=experts)
        self.linear_fc1 = _Weight(new_param(ParamSpec(
            (moe.num_experts, 2 * ffn if self.swiglu else ffn, h), shard_dim=1, chunks=2 if self.swiglu else 1,
            std=config.init_method_std, **etp), device, dtype))
        self.linear_fc2 = _Weight(new_param(ParamSpec(
            (moe.num_experts, h, ffn), shard_dim=2, std=config.init_method_std / math.sqrt(2 * config.num_layers),
            **etp), device, dtype))
        self.activation = mlp_activation(self.swiglu, config.torch_compile)
        self.backend = choose_backend(moe.grouped_gemm, torch.device(device or "cpu"),
                                      (h, ffn // etp_group.size), dtype or torch.float32)

    def forward(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """rows: [M, h] sorted by local expert, counts[e] rows for expert e -> [M, h] (partial over etp)."""
        offsets = torch.tensor(counts, device=rows.device).cumsum(0).to(torch.int32)
        h = self.activation(grouped_linear(rows, self.linear_fc1.weight, counts, offsets, self.backend))
        return grouped_linear(h, self.linear_fc2.weight, counts, offsets, self.backend)
