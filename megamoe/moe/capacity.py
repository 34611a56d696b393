"""Expert capacity: which (token, expert) assignments survive when an expert gets more than `capacity` tokens.

Decisions are made over the whole routing group (all tokens of the micro-batch, gathered across the ranks that
split it), with ties broken by global token position, so they are the same under every layout.
"""

from __future__ import annotations

import torch


def apply_capacity(probs: torch.Tensor, routing_map: torch.Tensor, capacity: int, policy: str,
                   pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most `capacity` tokens per expert.

    Args:
        probs: [N, E] routing weights (0 where not routed).
        routing_map: [N, E] bool, the top-k assignments.
        capacity: slots per expert.
        policy: "probs" keeps each expert's highest-weight tokens; "position" its earliest tokens.
        pad: fill every expert's slots: unrouted tokens (weight 0) take the free slots, in position order, so
            each expert processes exactly `capacity` rows.
    Returns:
        (probs, routing_map) with dropped assignments removed (and padding slots added when pad).
    """
    n = routing_map.shape[0]
    capacity = min(capacity, n)
    if policy == "probs":
        priority = torch.where(routing_map, probs.detach(), torch.full_like(probs, -1.0))
    else:
        order = torch.arange(n, 0, -1, device=probs.device, dtype=probs.dtype).unsqueeze(-1)  # earlier = higher
        priority = torch.where(routing_map, order, torch.full_like(probs, -1.0))
    # A stable sort keeps equal priorities in token order: ties go to the earlier token.
    chosen = torch.sort(priority, dim=0, descending=True, stable=True).indices[:capacity]   # [C, E]
    kept = torch.zeros_like(routing_map).scatter_(0, chosen, True)
    routed_and_kept = kept & routing_map
    # Padding slots are processed but weigh nothing in the combine.
    return probs * routed_and_kept, kept if pad else routed_and_kept
