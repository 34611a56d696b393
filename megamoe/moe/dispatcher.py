"""Token dispatchers: carry each (token, expert) assignment to the rank holding the expert and the result back.

Expert layers decompose the ranks of a pipeline stage as etp x ep x edp (MoE parallel folding): the tp_ep group
(ep x etp ranks, etp fastest) holds every expert exactly once, split by expert over ep and by hidden unit over etp.

AllGatherDispatcher (small ep):   all-gather tokens and routing over tp_ep -> each rank runs its experts on the
    assignments that are theirs -> weighted sum per token -> reduce-scatter over tp_ep (which also sums the etp
    partial outputs).
AllToAllDispatcher (large ep):    permute by expert -> all-to-all over ep -> all-gather over etp -> sort by local
    expert -> experts -> the same steps reversed, with a reduce-scatter over etp -> unpermute, weighted.

Dropless, both make exactly one device-to-host transfer per layer: the assignment counts that size the exchanges
and the expert GEMMs. With a capacity C they make none: a rank holding N tokens never has more than
S = min(C, N) assignments for one expert, so every exchange uses fixed buffers of S rows per expert (zero rows
where a slot is free; a zero row contributes nothing, forward or backward).
"""

from __future__ import annotations

import torch

from megamoe.moe.experts import GroupedExperts
from megamoe.moe.permute import expert_order, from_slots, permute, slot_order, to_slots, unpermute
from megamoe.parallel import regions
from megamoe.parallel.group import AxisGroup


class AllGatherDispatcher:
    """Dispatch by all-gather over the tp_ep group."""

    def __init__(self, tp_ep_group: AxisGroup, num_experts: int, num_local_experts: int, ep_index: int) -> None:
        self.group = tp_ep_group
        self.local_experts = slice(ep_index * num_local_experts, (ep_index + 1) * num_local_experts)

    def __call__(self, tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor,
                 experts: GroupedExperts, capacity: int | None = None) -> torch.Tensor:
        """tokens [N, h], probs and routing_map [N, E] -> [N, h]; capacity: None when dropless."""
        g = self.group
        all_tokens = regions.gather_from_sp_region(tokens, g)                                # [G N, h]
        all_probs = regions.gather_from_sp_region(probs, g)[:, self.local_experts]           # [G N, E_local]
        all_map = regions.gather_along(routing_map.to(torch.uint8), g, 0)[:, self.local_experts].bool()
        if capacity is None:
            counts = all_map.sum(0).tolist()                                                 # the host sync
            token_index, expert_index = expert_order(all_map, sum(counts))
            out = experts(permute(all_tokens, token_index), counts)
            weights = all_probs[token_index, expert_index]
        else:
            slots = g.size * min(capacity, tokens.shape[0])
            token_index, expert_index, valid, row = slot_order(all_map, slots)
            buffer = to_slots(all_tokens, token_index, row, all_map.shape[1] * slots)
            out = from_slots(experts(buffer, [slots] * all_map.shape[1]), row)
            weights = all_probs[token_index, expert_index] * valid
        combined = unpermute(out, token_index, weights, all_tokens.shape[0])
        return regions.reduce_scatter_to_sp_region(combined, g)                              # [N, h]


class AllToAllDispatcher:
    """Dispatch by all-to-all over ep, plus all-gather / reduce-scatter over etp."""

    def __init__(self, ep_group: AxisGroup, etp_group: AxisGroup, tp_ep_group: AxisGroup, num_experts: int) -> None:
        self.ep, self.etp, self.tp_ep = ep_group, etp_group, tp_ep_group
        self.num_local = num_experts // ep_group.size

    def _member(self, etp_index: int, ep_index: int) -> int:
        return etp_index + self.etp.size * ep_index  # position in tp_ep: etp varies fastest

    def _expert_sum(self, row: list[int], ep_index: int) -> int:
        return sum(row[ep_index * self.num_local:(ep_index + 1) * self.num_local])

    def __call__(self, tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor,
                 experts: GroupedExperts, capacity: int | None = None) -> torch.Tensor:
        """tokens [N, h], probs and routing_map [N, E] -> [N, h]; capacity: None when dropless."""
        if capacity is not None:
            return self._fixed(tokens, probs, routing_map, experts, min(capacity, tokens.shape[0]))
        ep, etp, n_local = self.ep, self.etp, self.num_local
        # Every rank's per-expert assignment counts, in one gather and one host sync.
        counts_local = routing_map.sum(0, dtype=torch.int64)
        counts = regions.gather_along(counts_local.unsqueeze(0), self.tp_ep, 0).tolist()     # [G][E]
        me = self._member(etp.index, ep.index)
        token_index, expert_index = expert_order(routing_map, sum(counts[me]))
        rows = permute(tokens, token_index)                                                  # [M, h] by expert
        weights = probs[token_index, expert_index]

        # 1. all-to-all over ep: ep peer j gets my rows for its experts.
        send = [self._expert_sum(counts[me], j) for j in range(ep.size)]
        recv = [self._expert_sum(counts[self._member(etp.index, j)], ep.index) for j in range(ep.size)]
        received = regions.all_to_all(rows, ep, recv, send)                                  # [src j][expert]

        # 2. all-gather over etp (uneven sizes: each member sends its whole block to every member).
        sizes = [sum(self._expert_sum(counts[self._member(i, j)], ep.index) for j in range(ep.size))
                 for i in range(etp.size)]
        if etp.size > 1:
            received = regions.all_to_all(received.repeat(etp.size, 1), etp, sizes, [received.shape[0]] * etp.size)

        # 3. sort [etp src i][ep src j][local expert e] blocks into [e][i][j] order for the grouped GEMM.
        blocks, start = {}, 0
        for i in range(etp.size):
            for j in range(ep.size):
                row = counts[self._member(i, j)]
                for e in range(n_local):
                    size = row[ep.index * n_local + e]
                    blocks[e, i, j] = (start, size)
                    start += size
        order = [(e, i, j) for e in range(n_local) for i in range(etp.size) for j in range(ep.size)]
        index = torch.cat([torch.arange(blocks[k][0], blocks[k][0] + blocks[k][1]) for k in order]
                          + [torch.empty(0, dtype=torch.int64)]).to(tokens.device)
        per_expert = [sum(blocks[e, i, j][1] for i in range(etp.size) for j in range(ep.size))
                      for e in range(n_local)]
        out = experts(received.index_select(0, index), per_expert)
        out = out.index_select(0, torch.argsort(index))                                      # back to [i][j][e]

        # 4. reduce-scatter over etp: member i gets (and sums) every member's partial output for its rows.
        if etp.size > 1:
            mine = sizes[etp.index]
            out = regions.all_to_all(out, etp, [mine] * etp.size, sizes).view(etp.size, mine, -1).sum(0)
        # 5. all-to-all back over ep, then weighted sum per token.
        out = regions.all_to_all(out, ep, send, recv)
        return unpermute(out, token_index, weights, tokens.shape[0])

    def _fixed(self, tokens, probs, routing_map, experts, slots):
        # Fixed splits: `slots` rows per (source rank, expert) everywhere, so no counts need exchanging.
        ep, etp, n_local = self.ep, self.etp, self.num_local
        h = tokens.shape[-1]
        token_index, expert_index, valid, row = slot_order(routing_map, slots)
        buffer = to_slots(tokens, token_index, row, routing_map.shape[1] * slots)          # [E S, h], by ep rank
        received = regions.all_to_all(buffer, ep)                                            # [ep, E_local, S, h]
        received = regions.gather_from_sp_region(received, etp)                              # [etp, ep, E_local, S, h]
        grid = received.view(etp.size, ep.size, n_local, slots, h)
        rows = grid.permute(2, 0, 1, 3, 4).reshape(-1, h)                                  # [E_local, etp, ep, S]
        out = experts(rows, [etp.size * ep.size * slots] * n_local)
        out = out.view(n_local, etp.size, ep.size, slots, h).permute(1, 2, 0, 3, 4).reshape(-1, h)
        out = regions.reduce_scatter_to_sp_region(out, etp)                                  # sums etp partials
        out = regions.all_to_all(out, ep)                                                    # [E S, h]
        weights = probs[token_index, expert_index] * valid
        return unpermute(from_slots(out, row), token_index, weights, tokens.shape[0])
