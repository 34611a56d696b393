"""TopKRouter: scores every token against every expert and decides, for the whole routing group, where it goes.

The routing group is the micro-batch. Under sequence parallelism its tokens are split over the tp ranks, so each
rank computes the small [tokens, experts] logits of its own tokens and all-gathers them: every rank then takes the
same decisions (top-k, capacity, drops, load-balancing losses) for the whole micro-batch and keeps its own rows.
Decisions therefore never depend on the layout, and ties break by expert index then global token position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.moe.capacity import apply_capacity
from megamoe.moe.config import MoEConfig
from megamoe.moe.losses import sequence_aux_loss, switch_aux_loss, z_loss
from megamoe.parallel import regions
from megamoe.parallel.group import AxisGroup
from megamoe.tensor_parallel.params import ParamSpec, new_param

_DTYPES = {None: None, "fp32": torch.float32, "fp64": torch.float64}


@dataclass
class Routing:
    """The router's decisions for this rank's tokens, plus what the metrics and losses need.

    probs: [N_local, E] combine weights, 0 where a token does not use an expert (or was dropped).
    routing_map: [N_local, E] bool, the assignments the experts process.
    aux_loss: the weighted sum of the load-balancing and z losses (a scalar tensor), or None.
    stats: detached per-routing-group tensors for MoE metrics (see metrics.py).
    """

    probs: torch.Tensor
    routing_map: torch.Tensor
    aux_loss: torch.Tensor | None
    stats: dict[str, torch.Tensor]


def _stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.topk does not promise which of equal values wins; a stable sort picks the lower index.
    values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


class TopKRouter(nn.Module):
    """Top-k routing with softmax or sigmoid scores, optional group limit, capacity and aux losses.

    Args:
        hidden_size: token width.
        moe: the MoE options.
        split_group: the group the routing group's tokens are split over (tp under sequence parallelism; a
            one-rank group otherwise).
        sequence_parallel: tokens arrive split over split_group (the weight's gradient is then partial per rank).
        std: init std of the router weight.
    """

    def __init__(self, hidden_size: int, moe: MoEConfig, split_group: AxisGroup, sequence_parallel: bool,
                 std: float, device=None, dtype=None) -> None:
        super().__init__()
        self.moe, self.split_group = moe, split_group
        self.weight = new_param(ParamSpec((moe.num_experts, hidden_size), std=std,
                                          sequence_parallel=sequence_parallel), device, dtype)

    def scores_and_topk(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs [N, E], routing_map [N, E], scores over all experts for the aux losses [N, E])."""
        m, k = self.moe, self.moe.router_topk
        if m.router_score_function == "softmax":
            scores = torch.softmax(logits, dim=-1)
            selection = scores if m.router_pre_softmax else logits
        else:
            scores = torch.sigmoid(logits)
            selection = scores
        if m.router_num_groups is not None:
            selection = self._limit_to_groups(selection)
        top_values, top_index = _stable_topk(selection, k)
        if m.router_score_function == "softmax" and not m.router_pre_softmax:
            top_probs = torch.softmax(top_values, dim=-1)
        else:
            top_probs = scores.gather(-1, top_index)
            if m.router_score_function == "sigmoid" and k > 1:
                top_probs = top_probs / (top_probs.sum(-1, keepdim=True) + 1e-20)
        if m.router_topk_scaling_factor is not None:
            top_probs = top_probs * m.router_topk_scaling_factor
        probs = torch.zeros_like(logits).scatter(-1, top_index, top_probs)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top_index, True)
        aux_scores = scores if m.router_score_function == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)
        return probs, routing_map, aux_scores

    def _limit_to_groups(self, selection: torch.Tensor) -> torch.Tensor:
        # A group's score is the sum of its best topk/group_topk experts; experts outside the best groups are
        # excluded from selection.
        m = self.moe
        n, e = selection.shape
        grouped = selection.view(n, m.router_num_groups, e // m.router_num_groups)
        group_scores = _stable_topk(grouped, m.router_topk // m.router_group_topk)[0].sum(-1)
        best_groups = _stable_topk(group_scores, m.router_group_topk)[1]
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter(-1, best_groups, True)
        allowed = allowed.unsqueeze(-1).expand_as(grouped).reshape(n, e)
        return selection.masked_fill(~allowed, float("-inf"))

    def forward(self, tokens: torch.Tensor, batch: int) -> Routing:
        """tokens: [N_local, h] in [s, b] order; batch: b (sequences in the micro-batch, for seq_aux_loss)."""
        m = self.moe
        dtype = _DTYPES[m.router_dtype] or tokens.dtype
        logits = F.linear(tokens.to(dtype), self.weight.to(dtype))            # [N_local, E]
        # The whole routing group's logits; the gradient of each rank's rows stays on that rank.
        logits = regions.gather_from_sp_region(logits, self.split_group, grad_reduce_scatter=False)  # [N, E]
        n = logits.shape[0]
        probs, routing_map, aux_scores = self.scores_and_topk(logits)

        aux_loss = None
        for kind, coeff in m.aux_loss_coeffs().items():
            if coeff == 0:
                continue
            loss = (switch_aux_loss(aux_scores, routing_map, m.router_topk) if kind == "aux_loss"
                    else sequence_aux_loss(aux_scores, routing_map, m.router_topk, batch))
            aux_loss = coeff * loss if aux_loss is None else aux_loss + coeff * loss
        if m.z_loss_coeff:
            loss = m.z_loss_coeff * z_loss(logits)
            aux_loss = loss if aux_loss is None else aux_loss + loss

        routed = routing_map
        capacity = m.capacity(n, self.training)
        if capacity is not None:
            probs, routing_map = apply_capacity(probs, routing_map, capacity, m.token_drop_policy,
                                                m.pad_expert_input_to_capacity)
        stats = {"scores": aux_scores.detach(), "routed": routed, "kept": routing_map & routed}
        mine = slice(self.split_group.index * (n // self.split_group.size),
                     (self.split_group.index + 1) * (n // self.split_group.size))
        return Routing(probs[mine], routing_map[mine], aux_loss, stats)
