"""Cross entropy over logits split by vocabulary across the tp group, without gathering the logits.

With z the logits of one token, t its target and rank r holding z[V_r] (its vocabulary slice):
    loss = log sum_v exp(z_v - m) - (z_t - m),      m = max_v z_v
Each rank computes its slice's max, its slice's sum of exp, and z_t if it owns t; two all-reduces over the group
(the max, then both sums in one tensor) give the loss. The gradient is softmax(z) - onehot(t), restricted to each
rank's slice, so the full [tokens, V] logits never exist on one rank.

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
        # logits: [s, b, V/tp] (this rank's vocabulary slice); target: [s, b] global ids.
        ctx.dtype = logits.dtype
        start, end = vocab_range(logits.shape[-1] * tp_group.size, tp_group)
        real = max(0, min(vocab_size, end) - start)  # this slice's entries that are real tokens
        logits = logits.float()
        if real < logits.shape[-1]:
            logits = torch.cat([logits[..., :real], logits.new_full(logits.shape[:-1] + (logits.shape[-1] - real,),
                                                                    float("-inf"))], dim=-1)
        max_logit = logits.max(dim=-1).values
        comm.all_reduce(max_logit, tp_group, op=comm.ReduceOp.MAX)
        shifted = logits - max_logit.unsqueeze(-1)
        outside = (target < start) | (target >= end)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)

        exp = shifted.exp()
        sums = torch.stack([exp.sum(dim=-1), target_logit])  # one reduction for both per-token numbers
        comm.all_reduce(sums, tp_group)
        sum_exp, target_logit = sums[0], sums[1]
        loss = sum_exp.log() - target_logit

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax.clone()
        onehot = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot)
        return (grad * grad_loss.unsqueeze(-1)).to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group: AxisGroup,
                                 vocab_size: int | None = None) -> torch.Tensor:
    """Per-token loss [s, b] (fp32) from vocab-split logits [s, b, V/tp] and global target ids [s, b].

    vocab_size: the real vocabulary; logits of ids >= vocab_size (padding) are left out. Default: no padding.
    """
    padded = logits.shape[-1] * tp_group.size
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group, padded if vocab_size is None else vocab_size)
