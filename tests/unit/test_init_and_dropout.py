"""Layout-invariant initialization and dropout, checked without any process group."""

import dataclasses

import pytest
import torch

from megamoe.parallel.group import AxisGroup
from megamoe.tensor_parallel.embedding import VocabParallelEmbedding
from megamoe.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megamoe.tensor_parallel.params import ParamSpec, global_init_tensor, initialize_parameters
from megamoe.tensor_parallel.random import DropoutContext, dropout, hash_key, hashed_uniform


def group(tp, index, first_rank=0):
    # Construction and initialization never communicate, so a group without a process group will do.
    return AxisGroup("tp", tuple(range(first_rank, first_rank + tp)), index)


def build(kind, tp, index, first_rank=0):
    g = group(tp, index, first_rank)
    layer = {"column": lambda: ColumnParallelLinear(16, 24, g, chunks=2),
             "row": lambda: RowParallelLinear(24, 16, g),
             "embedding": lambda: VocabParallelEmbedding(32, 8, g)}[kind]()
    initialize_parameters(layer, seed=5, prefix="decoder.layers.3.x.")
    return layer


@pytest.mark.parametrize("kind", ["column", "row", "embedding"])
@pytest.mark.parametrize("tp", [2, 4])
def test_shards_are_bitwise_slices_of_the_single_process_tensor(kind, tp):
    whole = build(kind, 1, 0).weight.detach()
    pieces = [build(kind, tp, r).weight.detach() for r in range(tp)]
    spec = build(kind, tp, 0).weight.spec
    rebuilt = torch.empty_like(whole)
    for r, piece in enumerate(pieces):
        dataclasses.replace(spec, shard_index=r).place_local(rebuilt, piece)
        assert torch.equal(piece, dataclasses.replace(spec, shard_index=r).take_local(whole))
    assert torch.equal(rebuilt, whole)


def test_same_slice_on_different_ranks_is_identical():
    # tp index 1 in the dp replica of ranks (0, 1) and in the replica of ranks (2, 3)
    a, b = build("column", 2, 1, first_rank=0), build("column", 2, 1, first_rank=2)
    assert torch.equal(a.weight, b.weight)


def test_swiglu_chunks_hold_matching_gate_and_up_rows():
    whole = build("column", 1, 0).weight.detach()      # [gate (12); up (12)] x 16
    second = build("column", 2, 1).weight.detach()      # rank 1 of 2: gate rows 6..11, then up rows 18..23
    assert torch.equal(second, torch.cat([whole[6:12], whole[18:24]]))


def test_padding_rows_start_at_zero_and_real_rows_ignore_the_padding():
    a = ParamSpec((10, 3), valid_rows=7)
    b = ParamSpec((16, 3), valid_rows=7)
    ta, tb = global_init_tensor(a, 1, "w"), global_init_tensor(b, 1, "w")
    assert torch.equal(ta[:7], tb[:7]) and torch.all(ta[7:] == 0) and torch.all(tb[7:] == 0)


def test_hashed_uniform_of_a_slice_is_the_slice_of_the_whole():
    key = hash_key(1, 2, 3)
    coords = (torch.arange(12), torch.tensor([5, 9]), torch.arange(8))
    whole = hashed_uniform(key, coords)
    part = hashed_uniform(key, (torch.arange(4, 8), torch.tensor([9]), torch.arange(8)))
    assert torch.equal(part, whole[4:8, 1:2])


def test_hashed_uniform_statistics():
    u = hashed_uniform(hash_key(0), (torch.arange(200), torch.arange(500)))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert (counts - 10000).abs().max() < 500  # about 5 sigma for 100000 draws
    # neighbouring coordinates and neighbouring keys are uncorrelated
    v = hashed_uniform(hash_key(1), (torch.arange(200), torch.arange(500)))
    assert abs(torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1].item()) < 0.01
    assert abs(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1].item()) < 0.01


def test_dropout_keeps_the_expected_fraction_and_scales():
    ctx = DropoutContext(seed=3, sample_ids=torch.arange(4))
    x = torch.ones(50, 4, 64)
    coords = (torch.arange(50), ctx.sample_ids, torch.arange(64))
    y = dropout(x, 0.25, True, ctx, (0, 1), coords)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    assert torch.equal(dropout(x, 0.25, False, ctx, (0, 1), coords), x)
    # another sample id or site draws another mask
    other = dropout(x, 0.25, True, DropoutContext(3, torch.arange(4) + 4), (0, 1), (coords[0], torch.arange(4) + 4,
                                                                                     coords[2]))
    assert not torch.equal(other, y)
    assert not torch.equal(dropout(x, 0.25, True, ctx, (0, 2), coords), y)
