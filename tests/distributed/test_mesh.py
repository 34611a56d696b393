"""ParallelMesh on real gloo ranks: its groups equal the layout's, and each really spans those ranks."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from megamoe.parallel import comm
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.layout import GROUP_KINDS, RankLayout
from megamoe.parallel.mesh import ParallelMesh


def _mesh_groups(config_kwargs):
    mesh = ParallelMesh(ParallelConfig(world_size=dist.get_world_size(), **config_kwargs))
    seen = {}
    for kind in GROUP_KINDS:
        group = mesh[kind]
        if group is None:
            seen[kind] = None
            continue
        # What torch thinks the group is, and what a sum over it gives.
        torch_ranks = dist.get_process_group_ranks(group.process_group) if group.process_group else [dist.get_rank()]
        total = torch.tensor([float(dist.get_rank())])
        comm.all_reduce(total, group)
        seen[kind] = (list(group.ranks), group.index, torch_ranks, total.item())
    shared = {k: mesh[k].process_group for k in ("tp", "mp") if mesh[k] is not None}
    return seen, mesh.coordinates, shared["tp"] is shared["mp"]


CONFIGS = [
    dict(tp=2, ep=4, etp=1),
    dict(tp=2, pp=2, ep=2, sequence_parallel=True),
    dict(tp=2, cp=2, pp=2, ep=2, etp=1),
    dict(pp=4, ep=2),
    dict(tp=2, pp=2, ep=2, etp=1, order="tp-cp-ep-pp-dp"),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_mesh_matches_layout_on_8_ranks(dist_run, kwargs):
    layout = RankLayout.from_config(ParallelConfig(world_size=8, **kwargs))
    for rank, (seen, coords, tp_is_mp) in enumerate(dist_run(8, _mesh_groups, kwargs)):
        assert coords == layout.coordinates(rank)
        for kind in GROUP_KINDS:
            expected = layout.group_of(kind, rank)
            if expected is None:
                assert seen[kind] is None
                continue
            ranks, index, torch_ranks, total = seen[kind]
            assert ranks == expected and ranks[index] == rank
            assert torch_ranks == expected  # the torch group spans exactly these ranks, in this order
            assert total == sum(expected)   # and a collective over it reaches exactly them
        # one torch group per distinct set of ranks: mp == tp when pp == 1
        assert tp_is_mp == (kwargs.get("pp", 1) == 1 and kwargs.get("tp", 1) > 1)


def _mesh_for_wrong_world():
    try:
        ParallelMesh(ParallelConfig(world_size=4, tp=2))
    except ValueError as err:
        return str(err)
    return None


def test_mesh_rejects_a_config_for_another_world_size(dist_run):
    for message in dist_run(2, _mesh_for_wrong_world):
        assert "made for 4 ranks but 2 were launched" in message


def _single_rank_groups_cost_nothing():
    mesh = ParallelMesh(ParallelConfig(world_size=2, tp=2), timeout=timedelta(seconds=30))
    x = torch.ones(3)
    with mesh.ledger.recording():
        comm.all_reduce(x, mesh["dp"])  # dp has one rank: no call, no record
        comm.barrier(mesh["cp"])
        out = torch.empty(3)
        comm.all_gather_into_tensor(out, x, mesh["ep"])
    return mesh["dp"].process_group, mesh.ledger.entries(), out.tolist(), x.tolist()


def test_single_rank_groups_cost_nothing(dist_run):
    for pg, entries, gathered, x in dist_run(2, _single_rank_groups_cost_nothing):
        assert pg is None and entries == {} and gathered == [1.0] * 3 and x == [1.0] * 3
