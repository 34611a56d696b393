"""A collective that cannot complete fails within the mesh's timeout, naming the group and its ranks."""

import os
import time
from datetime import timedelta

import pytest
import torch

from megamoe.parallel import comm
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.mesh import ParallelMesh
from tests.pool import GlooPool, RankFailure


def _absent_rank(timeout_s):
    mesh = ParallelMesh(ParallelConfig(world_size=2, tp=2), timeout=timedelta(seconds=timeout_s))
    if mesh.rank == 1:
        return None  # never joins: rank 0's all-reduce can only time out
    start = time.monotonic()
    try:
        comm.all_reduce(torch.ones(4), mesh["tp"])
    except comm.CollectiveError as err:
        return str(err), time.monotonic() - start
    return "completed", 0.0


def test_absent_rank_times_out_naming_group_and_ranks(dist_run):
    message, waited = dist_run(2, _absent_rank, 2.0)[0]
    assert "all_reduce on group 'tp' (ranks [0, 1]) did not complete" in message
    assert "timeout of 0:00:02" in message and "This is rank 0" in message
    assert 1.5 < waited < 30


def _dead_rank(report_path):
    mesh = ParallelMesh(ParallelConfig(world_size=2, pp=2), timeout=timedelta(seconds=20))
    comm.barrier(mesh["pp"])
    if mesh.rank == 1:
        os._exit(0)  # the process dies without a word
    time.sleep(0.5)
    try:
        comm.send_recv(mesh["pp"], sends=[(torch.ones(2), 1)], recvs=[(torch.empty(2), 1)])
        result = "completed"
    except comm.CollectiveError as err:
        result = str(err)
    with open(report_path, "w") as f:
        f.write(result)
    return result


def test_dead_rank_fails_naming_group_and_ranks(tmp_path):
    pool = GlooPool(2)
    report = tmp_path / "rank0.txt"
    try:
        with pytest.raises(RankFailure, match="rank 1's worker process died"):
            pool.run(_dead_rank, str(report), timeout=60)
    finally:
        pool.close()
    assert "send_recv on group 'pp' (ranks [0, 1]) did not complete" in report.read_text()
