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


def reduce_metrics(per_layer: dict[int, dict[str, torch.Tensor]], dp_group) -> dict[int, dict[str, list | float]]:
    """Metrics of every MoE layer for the log, over the data-parallel group (one routing group per replica):
    tokens per expert and unused experts are recomputed from the summed counts, the other values averaged. One
    all-reduce and one host transfer for all layers.

    per_layer: {layer number: MoELayer.metrics}; dp_group: the AxisGroup of data-parallel replicas (dp_cp).
    """
    from megamoe.parallel import comm

    layers = sorted(per_layer)
    if not layers:
        return {}
    averaged = [k for k in ("dropped_fraction", "entropy", "balance_top", "balance_bottom", "aux_loss")
                if all(k in per_layer[n] for n in layers)]
    rows = [torch.cat([per_layer[n]["tokens_per_expert"].to(torch.float64),
                       torch.stack([per_layer[n][k].to(torch.float64) for k in averaged]) / dp_group.size])
            for n in layers]
    packed = torch.stack(rows)
    comm.all_reduce(packed, dp_group)
    values = packed.tolist()
    experts = per_layer[layers[0]]["tokens_per_expert"].numel()
    out = {}
    for n, row in zip(layers, values):
        counts = row[:experts]
        out[n] = {"tokens_per_expert": [int(c) for c in counts], "unused_experts": sum(c == 0 for c in counts),
                  **dict(zip(averaged, row[experts:]))}
        if "expert_bias" in per_layer[n]:
            out[n]["expert_bias"] = per_layer[n]["expert_bias"].tolist()
    return out
