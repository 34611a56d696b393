"""The elementwise chains of a layer, as plain functions that --torch-compile hands to torch.compile.

Eager PyTorch runs each of these as several whole-tensor passes (with dtype casts in bf16); inductor fuses each
into one loop, computing in fp32 and rounding once. Without the flag the same formulas run eagerly (RMSNorm then
through the row-chunked op of rms_norm.py on CPU, SwiGLU through the op of swiglu.py, which is the formula's own
torch ops with a cheaper backward), so the compiled and eager paths compute the same formulas and the tests compare
them. Shapes are dynamic: the experts' row counts change every step.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from megamoe.model.swiglu import swiglu_op


def compiled(fn: Callable, enabled: bool) -> Callable:
    """fn compiled by torch.compile (inductor, dynamic shapes) when enabled, else fn itself."""
    return torch.compile(fn, dynamic=True) if enabled else fn


def mlp_activation(swiglu_gated: bool, enabled: bool) -> Callable:
    """The MLPs' and experts' activation: SwiGLU (the formula compiled when enabled, else the eager op of
    megamoe/model/swiglu.py, bitwise the formula's values and gradients) or GELU."""
    if not swiglu_gated:
        return F.gelu
    return compiled(swiglu, True) if enabled else swiglu_op


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] along the last dim: [..., 2f] -> [..., f]."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm_formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, in fp32 (or wider), rounded once to x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(compute)).to(x.dtype)
