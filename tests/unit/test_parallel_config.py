"""ParallelConfig: derived sizes, and a message naming the flags and the fix for each impossible layout."""

import argparse

import pytest

from megamoe.parallel.config import ParallelConfig


def test_derived_sizes():
    cfg = ParallelConfig(world_size=16, tp=2, cp=2, pp=2, ep=4, etp=1)
    assert (cfg.dp, cfg.edp) == (2, 2)
    assert ParallelConfig(world_size=8, tp=2, ep=2).etp == 2  # etp defaults to tp, as in Megatron-LM
    assert ParallelConfig(world_size=8, tp=2, ep=2).edp == 2


@pytest.mark.parametrize("kwargs, needles", [
    (dict(world_size=6, tp=4), ["world size 6 is not divisible by tp*cp*pp", "--tensor-model-parallel-size",
                                "--pipeline-model-parallel-size"]),
    (dict(world_size=8, pp=2, cp=3), ["not divisible", "--context-parallel-size"]),
    (dict(world_size=8, tp=2, ep=3, etp=1), ["fold", "--expert-model-parallel-size",
                                              "--expert-tensor-parallel-size", "divides 8"]),
    (dict(world_size=8, pp=2, ep=8, etp=1), ["fold", "tp*cp*dp = world/pp = 4"]),
    (dict(world_size=4, vpp=2), ["--virtual-pipeline-model-parallel-size=2 needs --pipeline-model-parallel-size > 1"]),
    (dict(world_size=4, sequence_parallel=True), ["--sequence-parallel needs --tensor-model-parallel-size > 1"]),
    (dict(world_size=4, tp=0), ["--tensor-model-parallel-size must be an integer >= 1"]),
    (dict(world_size=0), ["number of ranks", ">= 1"]),
    (dict(world_size=4, ep=-1), ["--expert-model-parallel-size must be an integer >= 1"]),
    (dict(world_size=4, pp=2, vpp=0), ["--virtual-pipeline-model-parallel-size must be an integer >= 1"]),
    (dict(world_size=4, order="tp-xx-dp-pp"), ["unknown tokens ['xx']"]),
    (dict(world_size=4, order="tp-dp-dp-pp"), ["repeated tokens ['dp']"]),
    (dict(world_size=4, tp=2, order="cp-dp-pp"), ["leaves out 'tp'"]),
    (dict(world_size=8, pp=2, ep=4, etp=1, order="tp-cp-ep-pp-dp"), ["pipeline stages on different ranks",
                                                                    "expert-dp 1 != dp 4"]),
])
def test_invalid_layouts_name_flags_and_fix(kwargs, needles):
    with pytest.raises(ValueError) as info:
        ParallelConfig(**kwargs)
    for needle in needles:
        assert needle in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as info:
        ParallelConfig(world_size=4, vpp=2, sequence_parallel=True)
    assert "--virtual-pipeline" in str(info.value) and "--sequence-parallel" in str(info.value)


def test_pp_before_dp_is_fine_when_expert_dp_equals_dp():
    cfg = ParallelConfig(world_size=8, tp=2, pp=2, ep=2, etp=1, order="tp-cp-ep-pp-dp")
    assert cfg.dp == cfg.edp == 2


def test_flags_parse_to_config():
    parser = argparse.ArgumentParser()
    ParallelConfig.add_arguments(parser)
    args = parser.parse_args(["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                              "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
                              "--sequence-parallel", "--use-tp-pp-dp-mapping"])
    cfg = ParallelConfig.from_args(args, world_size=16)
    assert (cfg.tp, cfg.pp, cfg.ep, cfg.etp, cfg.sequence_parallel) == (2, 2, 2, 1, True)
    assert cfg.order == "tp-cp-ep-pp-dp"
    with pytest.raises(ValueError, match="not both"):
        ParallelConfig.from_args(parser.parse_args(["--use-tp-pp-dp-mapping", "--rank-order", "tp-dp"]), 1)
