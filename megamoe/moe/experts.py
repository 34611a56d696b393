"""GroupedExperts: all of this rank's experts in one weight tensor per projection, run as one grouped GEMM.

Rows arrive sorted by local expert with host-side counts. Three interchangeable backends compute
y_e = act(x_e W1_e^T) W2_e^T for every expert e at once:
    "loop"          a Python loop of matmuls over the experts: the reference twin the others are tested against
    "torch"         torch._grouped_mm (CPU and CUDA in torch >= 2.8 for 16-byte-aligned shapes)
    "grouped_gemm"  the grouped_gemm package (CUDA only; imported only when present and on CUDA)
With expert-tensor parallelism each rank holds a slice of every expert's hidden units, so its output is a partial
sum that the dispatcher reduces over the etp group.

On CPU in bf16, each expert's rows are padded with zero rows to a multiple of ONEDNN_ROW_MULTIPLE first: torch runs
those GEMMs in oneDNN, which compiles a kernel for every new shape (about 0.3 ms each here) and caches 1024. Expert
row counts change every step, so unpadded, every MoE layer compiled 6 kernels per expert per step (the grouped GEMMs
of a small-preset training step: 1.05 s, against 0.81 s padded). A zero row changes no output and no gradient.
"""

from __future__ import annotations

import importlib.util
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.model.config import ModelConfig
from megamoe.model.fused import mlp_activation
from megamoe.parallel.group import AxisGroup
from megamoe.tensor_parallel.params import ParamSpec, new_param

BACKENDS = ("loop", "torch", "grouped_gemm")
ONEDNN_ROW_MULTIPLE = 32


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


def row_multiple(device: torch.device, dtype: torch.dtype) -> int:
    """The multiple each expert's row count is padded to: ONEDNN_ROW_MULTIPLE where torch's GEMMs are oneDNN's
    (bf16 on CPU; fp32 CPU GEMMs are BLAS calls, and GPU grouped GEMMs compile nothing per shape), else 1."""
    return ONEDNN_ROW_MULTIPLE if device.type == "cpu" and dtype == torch.bfloat16 else 1


def padded_layout(counts: list[int], multiple: int, device=None) -> tuple[list[int], torch.Tensor | None]:
    """Each expert's block of rows rounded up to a multiple of `multiple` rows: the padded counts and, for each of
    the sum(counts) real rows, its row in the padded layout (None when no block needs padding)."""
    padded = [-(-c // multiple) * multiple for c in counts]
    if padded == counts:
        return counts, None
    # Every row of expert e moves down by the padding of the blocks before it.
    starts = zip(itertools.accumulate(padded, initial=0), itertools.accumulate(counts, initial=0))
    shifts = [padded_start - start for padded_start, start in starts][:len(counts)]
    total = sum(counts)
    moved = torch.repeat_interleave(torch.tensor(shifts, device=device), torch.tensor(counts, device=device),
                                    output_size=total)
    return padded, torch.arange(total, device=device) + moved


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
        counts, real_rows = padded_layout(counts, row_multiple(rows.device, rows.dtype), rows.device)
        if real_rows is not None:
            rows = rows.new_zeros((sum(counts), rows.shape[-1])).index_copy(0, real_rows, rows)
        offsets = torch.tensor(counts, device=rows.device).cumsum(0).to(torch.int32)
        h = self.activation(grouped_linear(rows, self.linear_fc1.weight, counts, offsets, self.backend))
        out = grouped_linear(h, self.linear_fc2.weight, counts, offsets, self.backend)
        return out if real_rows is None else out.index_select(0, real_rows)
