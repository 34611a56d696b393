"""Per-layer MoE metrics (fairseq's and Megatron's), from one routing group's decisions.

All values are detached tensors (no host sync in the step); the logger reduces and prints them.
    tokens_per_expert   assignments each expert was routed (before capacity)         [E]
    dropped_fraction    share of assignments dropped by capacity (fairseq's overflow)
    entropy             mean over tokens of the routing distribution's entropy (nats)
    balance_top/bottom  share of assignments of the most / least loaded expert (1/E when balanced)
    unused_experts      experts that got no token
"""

from __future__ import annotations

import torch


def routing_metrics(scores: torch.Tensor, routed: torch.Tensor, kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """scores [N, E] routing distribution; routed / kept [N, E] bool assignments before / after capacity."""
    per_expert = routed.sum(0)
    assignments = per_expert.sum().clamp_min(1)
    share = per_expert.to(torch.float32) / assignments
    return {
        "tokens_per_expert": per_expert,
        "dropped_fraction": 1.0 - kept.sum().to(torch.float32) / assignments,
        "entropy": -(scores * scores.clamp_min(1e-20).log()).sum(-1).mean(),
        "balance_top": share.max(),
        "balance_bottom": share.min(),
        "unused_experts": (per_expert == 0).sum(),
    }
