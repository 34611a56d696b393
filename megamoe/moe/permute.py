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
