"""Causal attention computed in blocks of query positions, skipping the masked upper triangle.

    softmax(q k^T / sqrt(d) + causal mask) v        q [b, g, s*r, d], k and v [b, g, s, d] -> [b, g, s*r, d]

The r query heads sharing a key/value head (GQA) sit in the rows of q, ordered (position, head), so the queries
of a block of positions are one contiguous row range and every matmul is a plain bmm over (b, g) with no copy of
k or v per head. Block i (positions [i c, i c + c)) attends to keys [0, i c + c) only: with n blocks the matmuls
do (n + 1) / 2n of the full square's work; only the block's last c keys need a mask.

Why not torch's scaled_dot_product_attention: on CPU its flash kernel splits keys into 512-wide blocks, so at
sequence lengths up to 512 the causal mask saves nothing, and its backward recomputes the scores. Here the
probabilities are kept for backward (bf16 when the inputs are: (n + 1) / 2n x b x heads x s^2 elements per layer,
the reason the model uses this path only for moderate sequence lengths, see SelfAttention). Scores are rounded to
the inputs' dtype before the softmax, which runs in fp32 (torch's softmax accumulates bf16 in fp32), as
Megatron-Core's unfused attention does; key and value gradients are summed over blocks in fp32.
"""

from __future__ import annotations

import torch


def _diagonal_mask(block: int, heads: int, device: torch.device) -> torch.Tensor:
    """[block * heads, block]: True where a query row of a block (position, head) sees a key of the block's own
    range that lies after it. The same for every block (a shorter last block takes its top-left corner)."""
    positions = torch.arange(block, device=device).repeat_interleave(heads)
    return torch.arange(block, device=device) > positions[:, None]


class BlockCausalAttention(torch.autograd.Function):
    """The op; see the module docstring. Call through block_causal_attention."""

    @staticmethod
    def forward(ctx, q, k, v, block):
        b, g, rows, d = q.shape
        s = k.shape[2]
        heads = rows // s
        scale = d ** -0.5
        q3, k3, v3 = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)    # [b*g, s*r, d], [b*g, s, d]
        out = torch.empty_like(q3)
        probs = []
        mask = _diagonal_mask(block, heads, q.device)
        ignored = q3.new_zeros(())  # baddbmm with beta=0: scale x q k^T rounded once, as with a bias of zeros
        for first in range(0, s, block):
            last = min(first + block, s)
            r = slice(first * heads, last * heads)
            scores = torch.baddbmm(ignored, q3[:, r], k3[:, :last].transpose(1, 2), beta=0, alpha=scale)
            scores[:, :, first:].masked_fill_(mask[:(last - first) * heads, :last - first], float("-inf"))
            p = torch.softmax(scores, dim=-1)                               # [b*g, c*r, last]
            out[:, r] = torch.bmm(p, v3[:, :last])
            probs.append(p)
        # Through save_for_backward, so selective recomputation's checkpoint can drop the probabilities too.
        ctx.save_for_backward(q3, k3, v3, *probs)
        ctx.block, ctx.heads, ctx.shapes = block, heads, (q.shape, k.shape)
        return out.view(b, g, rows, d)

    @staticmethod
    def backward(ctx, grad_out):
        q3, k3, v3, *probs = ctx.saved_tensors
        block, heads = ctx.block, ctx.heads
        s, d = k3.shape[1], k3.shape[2]
        scale = d ** -0.5
        grad_out = grad_out.flatten(0, 1).contiguous()                      # [b*g, s*r, d]
        grad_q = torch.empty_like(q3)
        # Sums over blocks in fp32: a key's gradient collects a term from every block at or after it.
        accumulate = torch.promote_types(k3.dtype, torch.float32)
        grad_k = torch.zeros(k3.shape, dtype=accumulate, device=k3.device)
        grad_v = torch.zeros(v3.shape, dtype=accumulate, device=v3.device)
        for p, first in zip(probs, range(0, s, block)):
            last = min(first + block, s)
            r = slice(first * heads, last * heads)
            go = grad_out[:, r]
            grad_v[:, :last] += torch.bmm(p.transpose(1, 2), go)
            grad_p = torch.bmm(go, v3[:, :last].transpose(1, 2))            # [b*g, c*r, last]
            grad_scores = torch._softmax_backward_data(grad_p, p, -1, p.dtype)
            grad_q[:, r] = torch.bmm(grad_scores, k3[:, :last]).mul_(scale)
            grad_k[:, :last] += torch.bmm(grad_scores.transpose(1, 2), q3[:, r])
        q_shape, kv_shape = ctx.shapes
        return (grad_q.view(q_shape), grad_k.mul_(scale).to(k3.dtype).view(kv_shape),
                grad_v.to(v3.dtype).view(kv_shape), None)


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Causal attention; q [b, g, s*r, d] with rows (position, head), k and v [b, g, s, d] -> [b, g, s*r, d].

    k and v are made contiguous (the op slices their rows per block); q's rows must already be in that order.
    """
    if q.shape[2] % k.shape[2] or q.shape[:2] != k.shape[:2] or k.shape != v.shape:
        raise ValueError(f"block_causal_attention: q {tuple(q.shape)} must be [b, g, s*r, d] for k and v "
                         f"{tuple(k.shape)} [b, g, s, d]")
    return BlockCausalAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), block)
