"""Per-layer MoE metrics (fairseq's and Megatron's), from one routing group's decisions.

All values are detached tensors (no host sync in the step); the logger reduces and prints them.
    tokens_per_expert   assignments each expert was routed (before capacity)         [E]
    dropped_fraction    share of assignments dropped by capacity (fairseq's overflow)
    entropy             mean over tokens of the routing distribution's entropy (nats)
    balance_top/bottom  share of assignments of the most / least loaded expert (1/E when balanced)
    unused_experts      experts that got no token
    load_balancing_loss, z_loss   the router losses times their coefficients (when configured; set by MoELayer)
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


AVERAGED = ("dropped_fraction", "entropy", "balance_top", "balance_bottom", "load_balancing_loss", "z_loss")


def reduce_metrics(per_layer: dict[int, dict[str, torch.Tensor]], dp_group, pp_group=None, num_layers: int = 0,
                   num_experts: int = 0) -> dict[int, dict[str, list | float]]:
    """Metrics of every MoE layer for the log, over the data-parallel group (one routing group per replica):
    tokens per expert and unused experts are recomputed from the summed counts, the other values averaged. With
    pp_group, every pipeline stage's layers reach every stage (then num_layers and num_experts fix the packed
    shape on stages without MoE layers). One all-reduce per group and one host transfer for all layers.

    per_layer: {layer number: MoELayer.metrics}; dp_group, pp_group: AxisGroups (dp_cp and pp).
    """
    from megamoe.parallel import comm

    if pp_group is None:
        num_layers = max(per_layer, default=-1) + 1
        num_experts = next(iter(per_layer.values()))["tokens_per_expert"].numel() if per_layer else 0
    if not num_layers or not num_experts:
        return {}
    # Row per global layer: [held, has value for each AVERAGED key, has bias | counts [E] | AVERAGED | bias [E]].
    flags = 2 + len(AVERAGED)
    packed = torch.zeros(num_layers, flags + 2 * num_experts + len(AVERAGED), dtype=torch.float64)
    for n, m in per_layer.items():
        row = packed[n]
        row[0] = 1
        row[flags:flags + num_experts] = m["tokens_per_expert"].to(torch.float64)
        for k, key in enumerate(AVERAGED):
            if key in m:
                row[1 + k], row[flags + num_experts + k] = 1, m[key].to(torch.float64)
        if "expert_bias" in m:
            row[flags - 1] = 1
            row[-num_experts:] = m["expert_bias"].to(torch.float64)
    packed[:, :flags] /= dp_group.size
    packed[:, flags + num_experts:] /= dp_group.size
    comm.all_reduce(packed, dp_group)
    if pp_group is not None and pp_group.size > 1:
        comm.all_reduce(packed, pp_group)  # stages hold disjoint layers
    out = {}
    for n, row in enumerate(packed.tolist()):
        if row[0] < 0.5:
            continue
        counts = row[flags:flags + num_experts]
        out[n] = {"tokens_per_expert": [int(round(c)) for c in counts],
                  "unused_experts": sum(c == 0 for c in counts)}
        out[n].update({key: row[flags + num_experts + k] for k, key in enumerate(AVERAGED) if row[1 + k] > 0.5})
        if row[flags - 1] > 0.5:
            out[n]["expert_bias"] = row[-num_experts:]
    return out
