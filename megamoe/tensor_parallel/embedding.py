"""VocabParallelEmbedding: the word-embedding table split by vocabulary rows across the tp group."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.parallel import regions
from megamoe.parallel.group import AxisGroup
from megamoe.tensor_parallel.params import ParamSpec, new_param


def vocab_range(vocab_size: int, tp_group: AxisGroup) -> tuple[int, int]:
    """[start, end) of the vocabulary rows this rank holds (vocab_size is already padded to a multiple of tp)."""
    per_rank = vocab_size // tp_group.size
    return tp_group.index * per_rank, (tp_group.index + 1) * per_rank


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows [r V/tp, (r+1) V/tp). Each rank looks up the ids it owns (zeros elsewhere) and the partial
    tables are summed over the group (reduce-scattered along the sequence under SP).

    Args:
        vocab_size: padded vocabulary size (a multiple of tp).
        hidden_size: embedding width.
        tp_group: the group the rows are split over.
        sequence_parallel: return [s/tp, b, h] instead of [s, b, h].
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp_group: AxisGroup, *, sequence_parallel: bool = False,
                 std: float = 0.02, device=None, dtype=None) -> None:
        super().__init__()
        if vocab_size % tp_group.size:
            raise ValueError(f"padded vocab size {vocab_size} is not divisible by tp {tp_group.size}")
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.start, self.end = vocab_range(vocab_size, tp_group)
        self.weight = new_param(ParamSpec((vocab_size, hidden_size), shard_dim=0, shard_index=tp_group.index,
                                          shard_count=tp_group.size, std=std), device, dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [b, s] -> [s, b, h] (or [s/tp, b, h] under SP)."""
        ids = input_ids.t()  # [s, b]: the sequence dimension first, as everywhere after the embedding
        if self.tp_group.size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        local = F.embedding((ids - self.start).masked_fill(outside, 0), self.weight)
        local = local.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return regions.reduce_scatter_to_sp_region(local, self.tp_group)
        return regions.reduce_from_tp_region(local, self.tp_group)
