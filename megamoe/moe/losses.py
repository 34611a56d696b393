"""Router losses, and the autograd trick that adds their gradients without changing the layer's output.

Load-balancing loss (Switch Transformer / GShard), for N tokens, E experts, top-k routing:
    aux = E / (N^2 k) * sum_e (sum_t p_te) (sum_t m_te)
with p the router's scores over all experts and m the (pre-capacity) routing map: the product of the expert's
share of probability mass and its share of assignments, minimized by a uniform load. seq_aux_loss is the same per
sequence, averaged over sequences. The z-loss mean_t (logsumexp_e z_te)^2 keeps router logits small (ST-MoE).

AuxLossScaler passes the layer's output through unchanged and, in backward, gives the aux loss the gradient
`scale`: the losses reach the router without being returned, so pipeline schedules never carry them.
"""

from __future__ import annotations

import torch


def switch_aux_loss(scores: torch.Tensor, routing_map: torch.Tensor, topk: int) -> torch.Tensor:
    """scores, routing_map: [N, E] over one routing group."""
    n, e = scores.shape
    return e / (n * n * topk) * (scores.sum(0) * routing_map.sum(0).to(scores.dtype)).sum()


def sequence_aux_loss(scores: torch.Tensor, routing_map: torch.Tensor, topk: int, batch: int) -> torch.Tensor:
    """The aux loss of each sequence, averaged. Rows are tokens in [s, b] order (sequence position major)."""
    n, e = scores.shape
    s = n // batch
    per_seq_scores = scores.view(s, batch, e).sum(0)                        # [b, E]
    per_seq_counts = routing_map.view(s, batch, e).sum(0).to(scores.dtype)  # [b, E]
    return (e / (s * s * topk) * (per_seq_scores * per_seq_counts).sum(-1)).mean()


def global_aux_loss(scores: torch.Tensor, load: torch.Tensor, total_tokens: int, topk: int) -> torch.Tensor:
    """The aux loss with each expert's load taken over more than this routing group: E / (T^2 k) sum_e P_e load_e,
    with P_e this group's score mass, load_e the (averaged) step-wide assignments and T the step-wide tokens."""
    e = scores.shape[1]
    return e / (total_tokens * total_tokens * topk) * (scores.sum(0) * load.to(scores.dtype)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1).square().mean()


class AuxLossScaler(torch.autograd.Function):
    """Identity on `output`; in backward, d(loss)/d(aux_loss) = scale."""

    @staticmethod
    def forward(ctx, output, aux_loss, scale):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


def attach_aux_loss(output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
    """`output`, carrying aux_loss's gradient (times scale) into backward."""
    return AuxLossScaler.apply(output, aux_loss, scale)
