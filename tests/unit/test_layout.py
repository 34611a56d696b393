"""RankLayout against Megatron-Core's worked examples and an independent brute-force enumeration."""

import itertools

import pytest

from megamoe.parallel.config import DEFAULT_ORDER, TP_PP_DP_ORDER, ParallelConfig
from megamoe.parallel.layout import GROUP_KINDS, RankLayout, orthogonal_groups


def layout(**kw):
    return RankLayout.from_config(ParallelConfig(**kw))


# Megatron-Core's worked examples (design/megatron-facts.md, section 2.1) ------------------------------------------
def test_megatron_example_8_ranks_tp2_ep4():
    g = layout(world_size=8, tp=2, ep=4, etp=1).groups
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert g["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_megatron_example_16_ranks_tp2_cp2_pp2_ep4():
    g = layout(world_size=16, tp=2, cp=2, pp=2, ep=4, etp=1).groups
    assert g["cp"][:2] == [[0, 2], [1, 3]]
    assert g["dp_cp"][0] == [0, 2, 4, 6]
    assert g["pp"][0] == [0, 8]
    assert g["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


def test_embedding_groups_are_first_and_last_stage():
    g = layout(world_size=8, pp=4).groups
    assert g["pp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["embd"] == [[0, 6], [1, 7]]
    assert g["pos_embd"] == [[0], [1]]
    single = layout(world_size=2).groups
    assert single["embd"] == [[0], [1]] and single["pos_embd"] == [[0], [1]]


def test_orthogonal_groups_hand_example():
    # sizes (2, 3), leftmost fastest: rank = a + 2 b. Groups over axis b hold ranks with equal a.
    assert orthogonal_groups([2, 3], [False, True]) == [[0, 2, 4], [1, 3, 5]]
    assert orthogonal_groups([2, 3], [True, False]) == [[0, 1], [2, 3], [4, 5]]
    assert orthogonal_groups([2, 3], [True, True]) == [[0, 1, 2, 3, 4, 5]]


# Independent brute force ------------------------------------------------------------------------------------------
def brute_force_groups(order, sizes, spanned):
    """Ranks agreeing on every axis outside `spanned`, found by enumerating all coordinate tuples.

    Member order and group order follow from sorting: with leftmost-fastest strides, the mixed-radix position of a
    member (or of a group) increases with its rank.
    """
    axes = list(order)
    world = 1
    for a in axes:
        world *= sizes[a]
    buckets = {}
    # itertools.product varies the last axis fastest, so enumerate the reversed order.
    for digits in itertools.product(*(range(sizes[a]) for a in reversed(axes))):
        coords = dict(zip(reversed(axes), digits))
        rank, stride = 0, 1
        for a in axes:
            rank += coords[a] * stride
            stride *= sizes[a]
        key = tuple(coords[a] for a in axes if a not in spanned)
        buckets.setdefault(key, []).append(rank)
    assert sorted(r for g in buckets.values() for r in g) == list(range(world))
    return sorted(sorted(g) for g in buckets.values())


DENSE = {"tp": {"tp"}, "cp": {"cp"}, "dp": {"dp"}, "dp_cp": {"dp", "cp"}, "pp": {"pp"}, "mp": {"tp", "pp"},
         "tp_cp": {"tp", "cp"}, "tp_dp_cp": {"tp", "dp", "cp"}}
EXPERT = {"ep": {"ep"}, "etp": {"tp"}, "edp": {"dp"}, "tp_ep": {"tp", "ep"}, "tp_ep_pp": {"tp", "ep", "pp"}}


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_configs(max_world):
    for world in range(1, max_world + 1):
        for tp, cp, pp in itertools.product(divisors(world), repeat=3):
            if world % (tp * cp * pp):
                continue
            for ep, etp in itertools.product(divisors(world // pp), repeat=2):
                if (world // pp) % (ep * etp):
                    continue
                for order in (DEFAULT_ORDER, TP_PP_DP_ORDER):
                    try:
                        yield ParallelConfig(world_size=world, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, order=order)
                    except ValueError:
                        assert order == TP_PP_DP_ORDER  # only the pp-before-dp order can be refused here


def check_against_brute_force(cfg):
    lay = RankLayout.from_config(cfg)
    order = cfg.order_tokens
    for kinds, sizes in ((DENSE, cfg.dense_sizes()), (EXPERT, cfg.expert_sizes())):
        for kind, spanned in kinds.items():
            expected = brute_force_groups(order, sizes, spanned)
            assert lay.groups[kind] == expected, (cfg, kind)
    for kind in GROUP_KINDS:
        size = {"embd": min(cfg.pp, 2), "pos_embd": 1}.get(kind)
        expected_size = size or len(lay.groups[kind][0])
        assert all(len(g) == expected_size for g in lay.groups[kind])
        members = sorted(r for g in lay.groups[kind] for r in g)
        if kind in ("embd", "pos_embd"):
            assert len(set(members)) == len(members)  # no rank twice; only embedding ranks appear
        else:
            assert members == list(range(cfg.world_size)), kind  # every rank exactly once
    # group sizes from the config
    assert len(lay.groups["tp"][0]) == cfg.tp and len(lay.groups["dp"][0]) == cfg.dp
    assert len(lay.groups["ep"][0]) == cfg.ep and len(lay.groups["edp"][0]) == cfg.edp
    assert len(lay.groups["etp"][0]) == cfg.etp and len(lay.groups["pp"][0]) == cfg.pp
    # folding: both decompositions share pipeline groups; a rank's stage is the same in both
    for rank in range(cfg.world_size):
        c = lay.coordinates(rank)
        assert lay.group_of("pp", rank)[c["pp"]] == rank
        assert lay.group_of("tp", rank)[c["tp"]] == rank
        assert lay.group_of("ep", rank)[c["ep"]] == rank
        assert lay.group_of("edp", rank)[c["edp"]] == rank
        assert set(lay.group_of("tp_ep_pp", rank)) == set().union(
            *(lay.group_of("tp_ep", r) for r in lay.group_of("pp", rank)))


def test_every_valid_config_up_to_16_ranks():
    configs = list(valid_configs(16))
    assert len(configs) > 500
    for cfg in configs:
        check_against_brute_force(cfg)


@pytest.mark.full
def test_every_valid_config_up_to_64_ranks():
    for cfg in valid_configs(64):
        check_against_brute_force(cfg)


def test_sampled_configs_up_to_64_ranks():
    # A representative slice of the full matrix for the default pass: every 25th config of worlds 17..64.
    large = [cfg for cfg in valid_configs(64) if cfg.world_size > 16]
    for cfg in large[::25]:
        check_against_brute_force(cfg)


def test_json_has_exactly_the_documented_keys():
    d = layout(world_size=16, tp=2, pp=2, ep=4).to_json_dict()
    assert set(d) == {"groups", "dp", "edp"}
    assert list(d["groups"]) == ["tp", "pp", "dp", "dp_cp", "cp", "mp", "tp_cp", "tp_dp_cp", "embd", "pos_embd",
                                 "ep", "etp", "edp", "tp_ep", "tp_ep_pp"]
    assert d["dp"] == 4 and d["edp"] == 1  # etp defaults to tp: 16 / (2 * 4 * 2)


def test_virtual_stages():
    lay = layout(world_size=4, pp=4, vpp=2)
    assert lay.virtual_stages(0) == [0, 4] and lay.virtual_stages(3) == [3, 7]
