"""A checkpoint saved under one layout resumes under any other: pretrain_gpt.py's loop on warm gloo ranks saves
under tp2 pp2 ep2 with the distributed optimizer (8 ranks) and resumes under 1 rank, tp1 ep4 and pp4. The resumed
iterations' losses equal the unbroken run's to 1e-6 relative, and bitwise under the same layout."""

import json
import os

import pytest

from tests import entry_points

TINY = ("--mock-data --vocab-size 300 --num-layers 4 --hidden-size 32 --num-attention-heads 4 --group-query-attention "
        "--num-query-groups 2 --seq-length 16 --max-position-embeddings 16 --micro-batch-size 1 --global-batch-size 8 "
        "--train-iters 10 --log-interval 1 --eval-interval 1000 --eval-iters 0 --lr 1e-3 --normalization RMSNorm "
        "--position-embedding-type rope --swiglu --disable-bias-linear --untie-embeddings-and-output-weights "
        "--num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 0.01 --hidden-dropout 0 --attention-dropout 0 "
        "--num-workers 0 --adam-eps 1e-6").split()
SAVED_UNDER = ("--tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 2 "
               "--expert-model-parallel-size 2 --expert-tensor-parallel-size 1 --moe-token-dispatcher-type alltoall "
               "--use-distributed-optimizer").split()
RESUMED_UNDER = {
    "one rank": (1, []),
    "tp1 ep4 dp4": (4, "--expert-model-parallel-size 4 --use-distributed-optimizer".split()),
    "pp4": (4, "--pipeline-model-parallel-size 4".split()),
}



def _losses(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return {r["iteration"]: r["lm loss"] for r in map(json.loads, f) if r["split"] == "train"}


@pytest.fixture(scope="module")
def unbroken(dist_run, tmp_path_factory):
    """10 iterations under tp2 pp2 ep2, saving at 5 and 10."""
    root = tmp_path_factory.mktemp("unbroken")
    dist_run(8, entry_points.pretrain, TINY + SAVED_UNDER + ["--save", str(root / "ckpt"), "--save-interval", "5",
                                                  "--log-dir", str(root)], timeout=300)
    return root


def test_same_layout_resumes_bitwise(dist_run, unbroken, tmp_path):
    dist_run(8, entry_points.pretrain, TINY + SAVED_UNDER + ["--load", str(unbroken / "ckpt"), "--ckpt-step", "5",
                                                  "--log-dir", str(tmp_path)], timeout=300)
    expected, resumed = _losses(unbroken), _losses(tmp_path)
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    assert all(resumed[i] == expected[i] for i in resumed), (resumed, expected)


@pytest.mark.parametrize("layout", sorted(RESUMED_UNDER))
def test_other_layouts_resume_the_same_run(dist_run, unbroken, tmp_path, layout):
    world, flags = RESUMED_UNDER[layout]
    dist_run(world, entry_points.pretrain, TINY + flags + ["--load", str(unbroken / "ckpt"), "--ckpt-step", "5",
                                               "--log-dir", str(tmp_path)], timeout=300)
    expected, resumed = _losses(unbroken), _losses(tmp_path)
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    for i in resumed:
        assert abs(resumed[i] - expected[i]) <= 1e-6 * abs(expected[i]), (i, resumed[i], expected[i])


def test_async_save_snapshots_the_iteration_while_training_goes_on(dist_run, unbroken, tmp_path):
    dist_run(8, entry_points.pretrain, TINY + SAVED_UNDER + ["--save", str(tmp_path / "ckpt"), "--save-interval", "5",
                                                  "--async-save", "--log-dir", str(tmp_path / "async")], timeout=300)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["iter_0000005", "iter_0000010",
                                                     "latest_checkpointed_iteration.txt"]
    dist_run(1, entry_points.pretrain, TINY + ["--load", str(tmp_path / "ckpt"), "--ckpt-step", "5", "--log-dir",
                                   str(tmp_path / "resumed")], timeout=300)
    expected, resumed = _losses(unbroken), _losses(tmp_path / "resumed")
    assert _losses(tmp_path / "async") == expected  # saving in the background changes nothing
    for i in resumed:
        assert abs(resumed[i] - expected[i]) <= 1e-6 * abs(expected[i]), (i, resumed[i], expected[i])
