"""TopKRouter: scores every token against every expert and decides, for the whole routing group, where it goes.

The routing group is the micro-batch. Under sequence parallelism its tokens are split over the tp ranks, so each
rank computes the small [tokens, experts] logits of its own tokens and all-gathers them: every rank then takes the
same decisions (top-k, sinkhorn, expert choice, capacity, drops, load-balancing losses) for the whole micro-batch
and keeps its own rows. Ties break by expert index, then global token position; random choices (jitter, fairseq's
second-expert policies) are hashes of the token's global identity (tensor_parallel/random.py). So no decision
depends on the layout.

Routing modes:
    top-k          softmax (after or before selection) or sigmoid scores, optional group limit, expert bias
    sinkhorn       S-BASE: selection on a Sinkhorn-balanced assignment, weights from the raw scores (training)
    expert choice  each expert takes its `capacity` best tokens (non-causal)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.moe.capacity import apply_capacity
from megamoe.moe.config import MoEConfig
from megamoe.moe.losses import global_aux_loss, sequence_aux_loss, switch_aux_loss, z_loss
from megamoe.parallel import comm, regions
from megamoe.parallel.group import AxisGroup
from megamoe.tensor_parallel.params import ParamSpec, new_param
from megamoe.tensor_parallel.random import DropoutContext, hash_key, hashed_uniform

_DTYPES = {None: None, "fp32": torch.float32, "fp64": torch.float64}
# Names of the router's random draws, for their hash keys.
_JITTER, _SECOND_EXPERT = 101, 102


@dataclass
class Routing:
    """The router's decisions for this rank's tokens, plus what the metrics and losses need.

    probs: [N_local, E] combine weights, 0 where a token does not use an expert (or was dropped).
    routing_map: [N_local, E] bool, the assignments the experts process.
    aux_loss: the weighted sum of the load-balancing and z losses (a scalar tensor), or None.
    stats: detached per-routing-group tensors for MoE metrics (see metrics.py).
    capacity: at most this many assignments per expert in the routing group (None when dropless).
    """

    probs: torch.Tensor
    routing_map: torch.Tensor
    aux_loss: torch.Tensor | None
    stats: dict[str, torch.Tensor]
    capacity: int | None = None


def _stable_topk(x: torch.Tensor, k: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.topk does not promise which of equal values wins; a stable sort picks the lower index.
    values, indices = torch.sort(x, dim=dim, descending=True, stable=True)
    return values.narrow(dim, 0, k), indices.narrow(dim, 0, k)


def sinkhorn(logits: torch.Tensor, tol: float = 1e-4, max_iters: int = 1000) -> torch.Tensor:
    """Scale exp(logits) [N, E] so rows sum to 1/N and columns to 1/E (alternating normalization)."""
    cost = torch.exp(logits - logits.max())
    n, e = cost.shape
    row = torch.ones(n, dtype=cost.dtype, device=cost.device)
    col = torch.ones(e, dtype=cost.dtype, device=cost.device)
    for _ in range(max_iters):
        row = 1.0 / (n * ((cost * col).sum(1) + 1e-8))
        new_col = 1.0 / (e * ((cost * row.unsqueeze(1)).sum(0) + 1e-8))
        done = (new_col - col).abs().mean() < tol
        col = new_col
        if done:
            break
    return cost * col * row.unsqueeze(1)


class TopKRouter(nn.Module):
    """The router of one MoE layer.

    Args:
        hidden_size: token width.
        moe: the MoE options.
        split_group: the group the routing group's tokens are split over (tp under sequence parallelism; a
            one-rank group otherwise).
        sequence_parallel: tokens arrive split over split_group (the weight's gradient is then partial per rank).
        std: init std of the router weight.
        layer_number: names this layer's random draws.
        dp_group: the data-parallel replicas (dp_cp), for global_aux_loss.
    """

    def __init__(self, hidden_size: int, moe: MoEConfig, split_group: AxisGroup, sequence_parallel: bool,
                 std: float, layer_number: int = 0, device=None, dtype=None,
                 dp_group: AxisGroup | None = None) -> None:
        super().__init__()
        self.moe, self.split_group, self.layer_number, self.dp_group = moe, split_group, layer_number, dp_group
        if "global_aux_loss" in moe.load_balancing_type:
            if dp_group is None:
                raise ValueError("global_aux_loss needs the data-parallel group (dp_group)")
            # Assignments per expert over the step's micro-batches so far (all replicas), and how many there were.
            self.register_buffer("step_load", torch.zeros(moe.num_experts, device=device))
            self.step_micro_batches = 0
        self.weight = new_param(ParamSpec((moe.num_experts, hidden_size), std=std,
                                          sequence_parallel=sequence_parallel), device, dtype)
        if moe.router_enable_expert_bias:
            # Selection-only bias, and the routed counts since the last update (see update_expert_bias).
            self.register_buffer("expert_bias", torch.zeros(moe.num_experts, device=device))
            self.register_buffer("routed_counts", torch.zeros(moe.num_experts, device=device))
        if moe.router_type == "expert_choice":
            warnings.warn("--moe-router-type expert_choice is non-causal: a token's experts depend on later tokens "
                          "of the micro-batch, which an autoregressive model cannot see at inference", stacklevel=2)

    # Selection ----------------------------------------------------------------------------------------------------
    def scores_and_topk(self, logits: torch.Tensor, noise: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probs [N, E], routing_map [N, E], scores over all experts for the aux losses [N, E]).

        noise: [N, E] uniforms for the second-expert policies (one per token and expert).
        """
        m, k = self.moe, self.moe.router_topk
        if m.router_score_function == "softmax":
            scores = torch.softmax(logits, dim=-1)
            selection = scores if m.router_pre_softmax else logits
        else:
            scores = torch.sigmoid(logits)
            selection = scores
        if m.router_enable_expert_bias:
            selection = selection + self.expert_bias
        if m.router_num_groups is not None:
            selection = self._limit_to_groups(selection)
        if m.second_expert_policy == "sampling":
            # Gumbel-max: the second expert is drawn from the softmax over the others; the first stays the argmax.
            first = _stable_topk(selection, 1)[1]
            gumbel = -torch.log(-torch.log(noise.clamp(1e-9, 1 - 1e-9)))
            second = _stable_topk((selection + gumbel).scatter(-1, first, float("-inf")), 1)[1]
            top_index = torch.cat([first, second], dim=-1)
            top_values = selection.gather(-1, top_index)
        else:
            top_values, top_index = _stable_topk(selection, k)
        if m.router_score_function == "softmax" and not m.router_pre_softmax:
            top_probs = torch.softmax(top_values, dim=-1)
        else:
            top_probs = scores.gather(-1, top_index)
            if m.router_score_function == "sigmoid" and k > 1:
                top_probs = top_probs / (top_probs.sum(-1, keepdim=True) + 1e-20)
        if m.router_topk_scaling_factor is not None:
            top_probs = top_probs * m.router_topk_scaling_factor
        keep = torch.ones_like(top_index, dtype=torch.bool)
        if m.second_expert_policy == "random":
            # fairseq: keep the second expert with probability min(1, 2 p2), one draw per token.
            keep[:, 1] = 2 * top_probs[:, 1].detach() > noise[:, 0]
        probs = torch.zeros_like(logits).scatter(-1, top_index, top_probs * keep)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top_index, keep)
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

    def sinkhorn_routing(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """S-BASE: in training, choose experts on the Sinkhorn-balanced assignment; weights are sigmoid (top-1) or
        softmax scores of the raw logits, unnormalized over the chosen experts (Megatron-LM's semantics)."""
        k = self.moe.router_topk
        scores = torch.sigmoid(logits) if k == 1 else torch.softmax(logits, dim=-1)
        with torch.no_grad():
            basis = sinkhorn(logits.detach().float()) if self.training else scores.detach()
            top_index = _stable_topk(basis, k)[1]
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top_index, True)
        return scores * routing_map, routing_map, scores

    def expert_choice(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each expert takes the `capacity` tokens that score it highest (ties: the earlier token)."""
        scores = torch.softmax(logits, dim=-1)
        capacity = min(self.moe.capacity(logits.shape[0], self.training), logits.shape[0])
        chosen = _stable_topk(scores.detach(), capacity, dim=0)[1]                 # [C, E]
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(0, chosen, True)
        return scores * routing_map, routing_map, scores

    def _global_aux_loss(self, scores: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
        counts = routing_map.sum(0).to(self.step_load.dtype)
        comm.all_reduce(counts, self.dp_group)  # tp ranks hold whole micro-batches: sum over replicas only
        if torch._C._current_graph_task_id() == -1:  # not again when backward recomputes the forward
            self.step_load += counts
            self.step_micro_batches += 1
        load = self.step_load / max(self.step_micro_batches, 1)
        return global_aux_loss(scores, load, scores.shape[0] * self.dp_group.size, self.moe.router_topk)

    def reset_step_load(self) -> None:
        """Start a new optimizer step for global_aux_loss."""
        self.step_load.zero_()
        self.step_micro_batches = 0

    @torch.no_grad()
    def update_expert_bias(self, dp_group: AxisGroup) -> None:
        """Aux-loss-free balancing, once per optimizer step: sum the routed counts of every micro-batch of the
        step over the data-parallel group (tp ranks already hold whole micro-batches), then move each expert's
        bias by the update rate towards the mean load, and start counting afresh."""
        counts = self.routed_counts.clone()
        comm.all_reduce(counts, dp_group)
        self.expert_bias += self.moe.router_bias_update_rate * torch.sign(counts.mean() - counts)
        self.routed_counts.zero_()

    # Forward ------------------------------------------------------------------------------------------------------
    def _token_uniforms(self, ctx: DropoutContext | None, what: int, s: int, extra: int,
                        device: torch.device, seq_offset: int = 0) -> torch.Tensor:
        # Uniforms [s, b, extra] keyed by (seed, layer, what, global position, sample id, index).
        if ctx is None:
            raise ValueError("this router draws random numbers in training: pass sample_ids to the model")
        coords = (ctx.seq_offset + seq_offset + torch.arange(s, device=device), ctx.sample_ids,
                  torch.arange(extra, device=device))
        return hashed_uniform(hash_key(ctx.seed, self.layer_number, what), coords)

    def forward(self, tokens: torch.Tensor, batch: int, ctx: DropoutContext | None = None) -> Routing:
        """tokens: [N_local, h] in [s, b] order; batch: b (sequences in the micro-batch)."""
        m, group = self.moe, self.split_group
        dtype = _DTYPES[m.router_dtype] or tokens.dtype
        if m.input_jitter_eps and self.training:
            s_local = tokens.shape[0] // batch
            u = self._token_uniforms(ctx, _JITTER, s_local, tokens.shape[1], tokens.device, group.index * s_local)
            tokens = tokens * (1 - m.input_jitter_eps + 2 * m.input_jitter_eps * u.view_as(tokens)).to(tokens.dtype)
        logits = F.linear(tokens.to(dtype), self.weight.to(dtype))            # [N_local, E]
        # The whole routing group's logits; the gradient of each rank's rows stays on that rank.
        logits = regions.gather_from_sp_region(logits, group, grad_reduce_scatter=False)  # [N, E]
        n = logits.shape[0]

        if m.router_type == "expert_choice":
            probs, routing_map, aux_scores = self.expert_choice(logits)
        elif "sinkhorn" in m.load_balancing_type:
            probs, routing_map, aux_scores = self.sinkhorn_routing(logits)
        else:
            noise = None
            if m.second_expert_policy != "all" and self.training:
                noise = self._token_uniforms(ctx, _SECOND_EXPERT, n // batch, m.num_experts,
                                             logits.device).view(n, m.num_experts)
            elif m.second_expert_policy == "sampling":
                noise = torch.full_like(logits, 0.5)  # evaluation: no noise beyond a constant, i.e. plain top-2
            if m.second_expert_policy == "random" and not self.training:
                noise = torch.zeros_like(logits)       # evaluation keeps both experts
            probs, routing_map, aux_scores = self.scores_and_topk(logits, noise)

        aux_loss = None
        for kind, coeff in m.aux_loss_coeffs().items():
            if coeff == 0:
                continue
            if kind == "aux_loss":
                loss = switch_aux_loss(aux_scores, routing_map, m.router_topk)
            elif kind == "seq_aux_loss":
                loss = sequence_aux_loss(aux_scores, routing_map, m.router_topk, batch)
            else:
                loss = self._global_aux_loss(aux_scores, routing_map)
            aux_loss = coeff * loss if aux_loss is None else aux_loss + coeff * loss
        losses = {} if aux_loss is None else {"load_balancing_loss": aux_loss.detach()}
        if m.z_loss_coeff:
            loss = m.z_loss_coeff * z_loss(logits)
            losses["z_loss"] = loss.detach()
            aux_loss = loss if aux_loss is None else aux_loss + loss

        routed = routing_map
        capacity = m.capacity(n, self.training)
        if capacity is not None and m.router_type == "topk":
            probs, routing_map = apply_capacity(probs, routing_map, capacity, m.token_drop_policy,
                                                m.pad_expert_input_to_capacity)
        if m.router_enable_expert_bias and self.training and torch._C._current_graph_task_id() == -1:
            # Counted in the forward pass only, not again when backward recomputes activations.
            self.routed_counts += routed.sum(0).to(self.routed_counts.dtype)
        stats = {"scores": aux_scores.detach(), "routed": routed, "kept": routing_map & routed, **losses}
        if m.router_enable_expert_bias:
            stats["expert_bias"] = self.expert_bias.detach().clone()
        mine = slice(group.index * (n // group.size), (group.index + 1) * (n // group.size))
        return Routing(probs[mine], routing_map[mine], aux_loss, stats, capacity)
