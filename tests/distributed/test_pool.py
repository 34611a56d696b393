"""The gloo pool itself: results per rank, tracebacks of failing ranks, recovery from a hung body."""

import pytest
import torch
import torch.distributed as dist

from tests.pool import GlooPool, RankFailure


def _all_reduce_rank():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    return "fine"


def _hang_on_rank_one():
    if dist.get_rank() == 1:
        t = torch.zeros(1)
        dist.all_reduce(t)  # rank 0 never joins: this waits until the pool gives up
    return "done"


def test_all_reduce_results_per_rank(dist_run):
    assert dist_run(4, _all_reduce_rank) == [(r, 10.0) for r in range(4)]


def test_failing_rank_traceback_is_reported_and_pool_survives(dist_run):
    with pytest.raises(RankFailure) as info:
        dist_run(2, _fail_on_rank_one)
    assert "rank 1 raised" in str(info.value) and "deliberate failure on rank 1" in str(info.value)
    assert "rank 0 raised" not in str(info.value)
    assert dist_run(2, _all_reduce_rank) == [(0, 3.0), (1, 3.0)]


def test_hung_body_times_out_and_pool_is_rebuilt():
    pool = GlooPool(2)
    try:
        assert pool.run(_all_reduce_rank) == [(0, 3.0), (1, 3.0)]
        with pytest.raises(RankFailure, match=r"ranks \[1\] did not finish"):
            pool.run(_hang_on_rank_one, timeout=3.0)
        assert pool.run(_all_reduce_rank) == [(0, 3.0), (1, 3.0)]
        assert pool.starts == 2
    finally:
        pool.close()
