"""RMSNorm in a few fp32 passes over chunks of rows that stay in cache, forward and backward.

    y = x / sqrt(mean(x^2) + eps) * w            x [..., h], w [h]

On CPU, torch's F.rms_norm runs whole-tensor passes with dtype casts forward and autograd's chain of a dozen of
them backward: in bf16 several times the cost of layer_norm's fused kernels. Here, with x^ = x / rms and
g = dy * w (fp32, or the inputs' dtype if wider):
    dx = (g - x^ mean(g x^)) / rms        dw = sum over rows of dy x^
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements per pass: 1 MiB of fp32 rows stays in cache through the chunk's passes. A fixed element count rather
# than a fixed row count keeps the op's per-chunk overhead small at small hidden sizes.
ELEMENTS_PER_CHUNK = 1 << 18


def chunk_rows(hidden: int) -> int:
    """Rows of hidden features per pass."""
    return max(1, ELEMENTS_PER_CHUNK // hidden)


class RMSNormFunction(torch.autograd.Function):
    """The op; see the module docstring. Call through rms_norm."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.shape[-1]
        compute = torch.promote_types(x.dtype, torch.float32)
        x2, w = x.reshape(-1, h), weight.to(compute)
        out = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], 1, dtype=compute, device=x.device)
        step = chunk_rows(h)
        for i in range(0, x2.shape[0], step):
            rows = slice(i, i + step)
            xf = x2[rows].to(compute, copy=True)
            torch.rsqrt((xf * xf).mean(-1, keepdim=True).add_(eps), out=rstd[rows])
            out[rows] = xf.mul_(rstd[rows]).mul_(w)   # rounded once, after the weight
        ctx.save_for_backward(x, weight, rstd)
        return out.view_as(x)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        h = x.shape[-1]
        x2, dy2, rstd2 = x.reshape(-1, h), grad_out.reshape(-1, h), rstd.reshape(-1, 1)
        grad_x = torch.empty_like(x2)
        compute = torch.promote_types(x.dtype, torch.float32)
        grad_w = torch.zeros(h, dtype=compute, device=x.device) if ctx.needs_input_grad[1] else None
        w = weight.to(compute)
        step = chunk_rows(h)
        for i in range(0, x2.shape[0], step):
            rows = slice(i, i + step)
            xhat = x2[rows].to(compute, copy=True).mul_(rstd2[rows])
            dy = dy2[rows].to(compute, copy=True)
            if grad_w is not None:
                grad_w += (dy * xhat).sum(0)
            g = dy.mul_(w)
            g.sub_(xhat.mul_((g * xhat).mean(-1, keepdim=True))).mul_(rstd2[rows])
            grad_x[rows] = g
        return grad_x.view_as(x), None if grad_w is None else grad_w.to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x with a weight (see the module docstring); F.rms_norm off CPU, where its
    kernels are fused."""
    if x.device.type != "cpu":
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return RMSNormFunction.apply(x, weight, eps)
