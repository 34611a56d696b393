"""pretrain_gpt.py under torchrun: the same losses on 1 and 4 ranks, exit conditions, bad input without hangs."""

import json
import os
import subprocess
import sys

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ("--mock-data --vocab-size 512 --num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
        "--num-query-groups 2 --seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 "
        "--train-iters 20 --log-interval 1 --eval-interval 1000 --eval-iters 1 --lr 1e-3 --normalization RMSNorm "
        "--position-embedding-type rope --swiglu --disable-bias-linear --untie-embeddings-and-output-weights "
        "--num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 0.01 --hidden-dropout 0 --attention-dropout 0 "
        "--num-workers 0").split()


def run(nproc, extra, log_dir, timeout=600):
    cmd = ([sys.executable, "pretrain_gpt.py"] if nproc == 1 else [*TORCHRUN, "--nproc-per-node", str(nproc),
                                                                  "pretrain_gpt.py"])
    return subprocess.run(cmd + TINY + extra + ["--log-dir", str(log_dir)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def losses(log_dir):
    return [json.loads(line)["lm loss"] for line in open(os.path.join(log_dir, "metrics.jsonl"))]


def test_four_ranks_train_the_same_model_as_one(tmp_path):
    one = run(1, [], tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    four = run(4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2",
                   "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
                   "--moe-token-dispatcher-type", "alltoall", "--use-distributed-optimizer"], tmp_path / "four")
    assert four.returncode == 0, four.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "four")
    assert len(a) == len(b) == 20
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x)
    assert "iteration       20/      20 | consumed samples:          160 |" in four.stdout


def test_exit_interval_stops_at_that_iteration(tmp_path):
    proc = run(1, ["--exit-interval", "3"], tmp_path)
    assert proc.returncode == 0 and "exiting at iteration 3" in proc.stdout
    assert len(losses(tmp_path)) == 3


def test_bad_batch_sizes_fail_on_every_rank_before_any_collective(tmp_path):
    proc = run(2, ["--global-batch-size", "6", "--micro-batch-size", "4"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("--global-batch-size 6 is not divisible by --micro-batch-size 4") == 2
