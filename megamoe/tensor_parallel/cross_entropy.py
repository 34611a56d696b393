"""Cross entropy over logits split by vocabulary across the tp group, without gathering the logits.

With z the logits of one token, t its target and rank r holding z[V_r] (its vocabulary slice):
    loss = log sum_v exp(z_v - m) - (z_t - m),      m = max_v z_v
Each rank computes its slice's softmax and log-sum-exp and z_t if it owns t; two all-reduces of per-token numbers
(the largest slice log-sum-exp, then the sums) give the loss. The gradient is softmax(z) - onehot(t), restricted
to each rank's slice, so the full [tokens, V] logits never exist on one rank. It is formed in the forward, on CPU
32 rows at a time while they are in cache, and kept in the logits' dtype; backward scales it by the incoming
gradient. (Under tp the slice's softmax is computed a second time, once the global log-sum-exp is known.)

Logits of padded vocabulary entries (ids >= vocab_size, which exist because the vocabulary is padded to a multiple
of 128 x tp) are excluded from the softmax: the loss is then the same for every tp, and padded rows get no gradient.
"""

from __future__ import annotations

import torch

from megamoe.parallel import comm
from megamoe.parallel.group import AxisGroup
from megamoe.tensor_parallel.embedding import vocab_range


# Rows of logits per pass on CPU: [32, V] in fp32 stays in cache between the softmax, its log-sum-exp and the
# gradient. On GPUs one pass over all rows (their kernels cast on the fly, and each chunk would cost launches).
ROWS_PER_CHUNK = 32


def _chunk_rows(rows: torch.Tensor) -> int:
    return ROWS_PER_CHUNK if rows.device.type == "cpu" else max(rows.shape[0], 1)


def _slice_softmax(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax (fp32) of logits rows z [n, V_r] and their log-sum-exp [n]: lse = max z - log max softmax, which
    needs no second exp pass and is exact where the softmax is largest."""
    if z.device.type == "cpu":
        # The cast softmax(dtype=fp32) would make anyway, kept: CPU's amax over fp32 rows takes a quarter of the
        # time of amax over the bf16 ones. (GPU kernels cast on the fly; a full fp32 copy would only cost memory.)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
    softmax = torch.softmax(z, dim=-1, dtype=torch.float32)
    return softmax, z.amax(dim=-1).float() - softmax.amax(dim=-1).log()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, vocab_size, in_place):
        # logits: [s, b, V/tp] (this rank's vocabulary slice, any float dtype); target: [s, b] global ids.
        start, end = vocab_range(logits.shape[-1] * tp_group.size, tp_group)
        real = max(0, min(vocab_size, end) - start)  # this slice's entries that are real tokens
        rows = logits.reshape(-1, logits.shape[-1])   # [s*b, V/tp]
        target = target.reshape(-1)
        outside = (target < start) | (target >= end)
        local_target = (target - start).masked_fill(outside, 0).clamp_max(max(real - 1, 0))
        inside = (~outside).float()
        target_logit = (rows[:, :real].gather(-1, local_target.unsqueeze(-1)).squeeze(-1).float()
                        .masked_fill(outside, 0.0) if real else torch.zeros(target.shape, device=logits.device))
        step = _chunk_rows(rows)
        chunks = [slice(i, i + step) for i in range(0, rows.shape[0], step)] if real else []
        # The gradient softmax - onehot(target) is formed here, chunk by chunk while the chunk is in cache, and
        # kept in the logits' dtype (rounded once, as autograd would round it for the output layer's matmul);
        # backward only scales it. Padded vocabulary entries get no gradient. In place, each chunk's gradient
        # overwrites its logits once they are read: no second [tokens, V/tp] tensor.
        in_place = in_place and logits.is_contiguous()  # rows is then a view of the logits
        grad = rows if in_place else torch.empty_like(rows)
        grad[:, real:] = 0
        local_lse = torch.full(target.shape, float("-inf"), device=logits.device)

        def write_grad(piece, softmax):
            softmax.scatter_add_(-1, local_target[piece].unsqueeze(-1), -inside[piece].unsqueeze(-1))
            grad[piece, :real] = softmax

        for piece in chunks:
            softmax, local_lse[piece] = _slice_softmax(rows[piece, :real])
            if tp_group.size == 1:
                write_grad(piece, softmax)
        if tp_group.size > 1:
            # lse = log sum_r exp(lse_r): the max over ranks, then one all-reduce for both per-token sums.
            top_lse = local_lse.clone()
            comm.all_reduce(top_lse, tp_group, op=comm.ReduceOp.MAX)
            sums = torch.stack([(local_lse - top_lse).exp(), target_logit])
            comm.all_reduce(sums, tp_group)
            lse, target_logit = top_lse + sums[0].log(), sums[1]
            share = (local_lse - lse).exp()           # this slice's share of the global softmax
            for piece in chunks:                        # the slice's softmax again, now that lse is known
                softmax, _ = _slice_softmax(rows[piece, :real])
                write_grad(piece, softmax.mul_(share[piece].unsqueeze(-1)))
        else:
            lse = local_lse
        ctx.save_for_backward(logits if in_place else grad)  # autograd keeps a tensor of its own, not a view
        ctx.shape = logits.shape
        return (lse - target_logit).view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_loss):
        # (softmax - onehot(target)) x the incoming gradient; the saved tensor is scaled in place, chunk by chunk:
        # a bf16 x fp32 product over the whole tensor would go through a full-size fp32 temporary (10x slower).
        grad = ctx.saved_tensors[0].view(-1, ctx.shape[-1])
        grad_loss, step = grad_loss.reshape(-1, 1), _chunk_rows(grad)
        if grad.device.type == "cpu" and grad_loss.dtype != grad.dtype:
            # A factor the gradient's dtype holds exactly (1/tokens for a power-of-two token count) gives the same
            # products, each rounded once from fp32, in a same-dtype multiply: half the time of a mixed one on CPU.
            narrow = grad_loss.to(grad.dtype)
            if torch.equal(narrow.to(grad_loss.dtype), grad_loss):
                grad_loss = narrow
        for i in range(0, grad.shape[0], step):
            piece = grad[i:i + step]
            torch.mul(piece, grad_loss[i:i + step], out=piece)
        return grad.view(ctx.shape), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group: AxisGroup,
                                 vocab_size: int | None = None, in_place: bool = False) -> torch.Tensor:
    """Per-token loss [s, b] (fp32) from vocab-split logits [s, b, V/tp] and global target ids [s, b].

    vocab_size: the real vocabulary; logits of ids >= vocab_size (padding) are left out. Default: no padding.
    in_place: the logits' memory holds the gradient afterwards (their values are gone), as in Megatron-Core; for a
        caller that owns the logits and needs nothing else from them. Saves a [s, b, V/tp] tensor.
    """
    padded = logits.shape[-1] * tp_group.size
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group, padded if vocab_size is None else vocab_size,
                                            in_place)
