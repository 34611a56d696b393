"""Permuting tokens into expert order and back, by index (deterministic, exact inverse)."""

from __future__ import annotations

import torch


def expert_order(routing_map: torch.Tensor, num_assignments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token index, expert index) of every assignment, sorted by expert, then by token.

    routing_map: [N, E] bool; num_assignments: its number of True entries (a host integer known from the counts,
    so no extra device-to-host sync is needed here).
    """
    n = routing_map.shape[0]
    flat = routing_map.t().reshape(-1).to(torch.int8)                       # expert-major
    positions = torch.argsort(flat, descending=True, stable=True)[:num_assignments]
    return positions % n, positions // n


def permute(tokens: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """[N, h] -> [M, h]: one row per assignment, in expert order."""
    return tokens.index_select(0, token_index)


def unpermute(rows: torch.Tensor, token_index: torch.Tensor, weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[M, h] -> [N, h]: each token's rows, weighted and summed (tokens with no row get zeros)."""
    out = rows.new_zeros((num_tokens, rows.shape[-1]))
    return out.index_add(0, token_index, rows * weights.unsqueeze(-1).to(rows.dtype))


def slot_order(routing_map: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed-size expert buffers without a host sync: each expert gets `slots` rows, filled in token order.

    Valid when no expert has more than `slots` assignments (capacity guarantees it). Returns, for the E * slots
    candidate entries: token index, expert index, whether it is a real assignment, and its row in the
    [E * slots + 1, h] buffer (row E * slots is a dump row for non-assignments).
    """
    n, e = routing_map.shape
    flat = routing_map.t().reshape(-1)
    take = min(e * slots, flat.numel())
    order = torch.argsort(flat.to(torch.int8), descending=True, stable=True)[:take]   # assignments first
    token, expert = order % n, order // n
    valid = flat[order]
    counts = routing_map.sum(0)
    first = torch.cumsum(counts, 0) - counts                                          # each expert's first entry
    row = expert * slots + torch.arange(take, device=order.device) - first[expert]
    return token, expert, valid, torch.where(valid, row, torch.full_like(row, e * slots))


def to_slots(tokens: torch.Tensor, token: torch.Tensor, row: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[N, h] -> [num_rows, h] expert buffers (zeros where no token); non-assignments go to a dropped dump row."""
    buffer = tokens.new_zeros((num_rows + 1, tokens.shape[-1])).index_copy(0, row, tokens.index_select(0, token))
    return buffer[:num_rows]


def from_slots(buffer: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The buffer rows of each entry of slot_order (zeros for non-assignments)."""
    padded = torch.cat([buffer, buffer.new_zeros((1, buffer.shape[-1]))])
    return padded.index_select(0, row)
