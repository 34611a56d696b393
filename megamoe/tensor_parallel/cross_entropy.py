"""Cross entropy over logits split by vocabulary across the tp group, without gathering the logits.

With z the logits of one token, t its target and rank r holding z[V_r] (its vocabulary slice):
    loss = log sum_v exp(z_v - m) - (z_t - m),      m = max_v z_v
Each rank computes its slice's softmax and log-sum-exp (one fused pass) and z_t if it owns t; two all-reduces
of per-token numbers (the largest slice log-sum-exp, then the sums) give the loss. The gradient is
softmax(z) - onehot(t), restricted to each rank's slice, so the full [tokens, V] logits never exist on one rank.

Logits of padded vocabulary entries (ids >= vocab_size, which exist because the vocabulary is padded to a multiple
of 128 x tp) are excluded from the softmax: the loss is then the same for every tp, and padded rows get no gradient.
"""

from __future__ import annotations

import torch

from megamoe.parallel import comm
from megamoe.parallel.group import AxisGroup
from megamoe.tensor_parallel.embedding import vocab_range


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, vocab_size):
        # logits: [s, b, V/tp] (this rank's vocabulary slice, any float dtype); target: [s, b] global ids.
        start, end = vocab_range(logits.shape[-1] * tp_group.size, tp_group)
        real = max(0, min(vocab_size, end) - start)  # this slice's entries that are real tokens
        z = logits[..., :real]                       # padding left out (a view)
        outside = (target < start) | (target >= end)
        local_target = (target - start).masked_fill(outside, 0)
        # One fused pass for the slice's softmax (fp32 out, whatever the logits' dtype) ...
        softmax = torch.softmax(z, dim=-1, dtype=torch.float32) if real else z.new_empty(z.shape, dtype=torch.float32)
        # ... and its log-sum-exp from the softmax at the slice's maximum: lse = max - log softmax[argmax].
        if real:
            top, where = z.max(dim=-1)
            local_lse = top.float() - softmax.gather(-1, where.unsqueeze(-1)).squeeze(-1).log()
        else:
            local_lse = torch.full(target.shape, float("-inf"), device=logits.device)
        target_logit = z.gather(-1, local_target.clamp_max(max(real - 1, 0)).unsqueeze(-1)).squeeze(-1).float() \
            if real else torch.zeros(target.shape, device=logits.device)
        target_logit = target_logit.masked_fill(outside, 0.0)
        if tp_group.size > 1:
            # lse = log sum_r exp(lse_r): the max over ranks, then one all-reduce for both per-token sums.
            top_lse = local_lse.clone()
            comm.all_reduce(top_lse, tp_group, op=comm.ReduceOp.MAX)
            sums = torch.stack([(local_lse - top_lse).exp(), target_logit])
            comm.all_reduce(sums, tp_group)
            lse, target_logit = top_lse + sums[0].log(), sums[1]
            softmax.mul_((local_lse - lse).exp().unsqueeze(-1))  # this slice's share of the global softmax
        else:
            lse = local_lse
        ctx.dtype, ctx.width = logits.dtype, logits.shape[-1]
        ctx.save_for_backward(softmax, local_target, outside)
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        # softmax - onehot(target), scaled by the incoming gradient; the saved softmax is reused in place.
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax
        if grad.shape[-1]:
            onehot = (~outside).to(grad.dtype).unsqueeze(-1)
            grad.scatter_add_(-1, local_target.clamp_max(grad.shape[-1] - 1).unsqueeze(-1), -onehot)
        grad = grad.mul_(grad_loss.unsqueeze(-1)).to(ctx.dtype)
        if grad.shape[-1] < ctx.width:  # padded vocabulary entries get no gradient
            grad = torch.cat([grad, grad.new_zeros(grad.shape[:-1] + (ctx.width - grad.shape[-1],))], dim=-1)
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group: AxisGroup,
                                 vocab_size: int | None = None) -> torch.Tensor:
    """Per-token loss [s, b] (fp32) from vocab-split logits [s, b, V/tp] and global target ids [s, b].

    vocab_size: the real vocabulary; logits of ids >= vocab_size (padding) are left out. Default: no padding.
    """
    padded = logits.shape[-1] * tp_group.size
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group, padded if vocab_size is None else vocab_size)
