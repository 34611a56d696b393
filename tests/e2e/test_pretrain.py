"""pretrain_gpt.py under torchrun: the same losses on 1 and 4 ranks, exit conditions, bad input without hangs."""

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.ranks import run_ranks

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ("--mock-data --vocab-size 512 --num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
        "--num-query-groups 2 --seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 "
        "--train-iters 20 --log-interval 1 --eval-interval 1000 --eval-iters 1 --lr 1e-3 --normalization RMSNorm "
        "--position-embedding-type rope --swiglu --disable-bias-linear --untie-embeddings-and-output-weights "
        "--num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 0.01 --hidden-dropout 0 --attention-dropout 0 "
        "--num-workers 0").split()


def run(nproc, extra, log_dir, timeout=600, extra_env=None):
    cmd = ([sys.executable, "pretrain_gpt.py"] if nproc == 1 else [*TORCHRUN, "--nproc-per-node", str(nproc),
                                                                  "pretrain_gpt.py"])
    return subprocess.run(cmd + TINY + extra + ["--log-dir", str(log_dir)], capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(extra_env or {})})


def records(log_dir, split="train"):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def losses(log_dir):
    return [r["lm loss"] for r in records(log_dir)]


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
    results = run_ranks(2, [sys.executable, "pretrain_gpt.py", *TINY, "--global-batch-size", "6",
                            "--micro-batch-size", "4", "--log-dir", str(tmp_path)])
    for proc in results:  # each rank fails by itself: no rank waits for the other in a collective
        assert proc.returncode == 2
        assert "--global-batch-size 6 is not divisible by --micro-batch-size 4" in proc.stderr


def test_megatron_mixtral_script_runs_tiny_with_mock_data(tmp_path):
    sizes = dict(GPUS_PER_NODE="4", MASTER_PORT="29517", SEQ_LENGTH="32", MAX_POSITION_EMBEDDINGS="32",
                 NUM_LAYERS="4", HIDDEN_SIZE="64", FFN_HIDDEN_SIZE="128", NUM_ATTENTION_HEADS="4",
                 NUM_QUERY_GROUPS="2", NUM_EXPERTS="4", EP="2", TP="2", PP="2", GLOBAL_BATCH_SIZE="4",
                 TRAIN_ITERS="2", LR_DECAY_ITERS="2", LR_WARMUP_ITERS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", "examples/mixtral/train_mixtral_8x7b.sh", "--mock-data", "--vocab-size", "512",
                           "--expert-tensor-parallel-size", "1", "--log-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**ENV, **sizes})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses(tmp_path)) == 2 and "iteration        2/       2" in proc.stdout
    assert proc.stdout.count("--moe-grouped-gemm: the grouped_gemm package needs CUDA; experts use torch") == 1


def test_sigterm_with_the_handler_saves_and_exits_cleanly(tmp_path):
    import signal
    import time

    cmd = [sys.executable, "pretrain_gpt.py", *TINY, "--train-iters", "100000", "--exit-signal-handler",
           "--log-dir", str(tmp_path), "--save", str(tmp_path / "ckpt")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "exiting at iteration" in out
    iteration = int(open(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read())
    assert f"saved checkpoint {tmp_path / 'ckpt' / f'iter_{iteration:07d}'} at iteration {iteration}" in out


def test_loss_falls_on_real_text(tmp_path):
    run_dir = tmp_path / "demo"
    for cmd in (["tools/make_demo_corpus.py", "--output", str(run_dir / "corpus.jsonl"), "--max-mb", "2",
                 "--text-sample", str(run_dir / "sample.txt")],
                ["tools/train_tokenizer.py", "--input", str(run_dir / "sample.txt"), "--model-prefix",
                 str(run_dir / "tok"), "--vocab-size", "1000"],
                ["tools/preprocess_data.py", "--input", str(run_dir / "corpus.jsonl"), "--output-prefix",
                 str(run_dir / "corpus"), "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                 str(run_dir / "tok.model"), "--append-eod", "--workers", "1"]):
        subprocess.run([sys.executable, *cmd], check=True, capture_output=True, env=ENV)
    real = [a for a in TINY if a not in ("--mock-data",)]
    real[real.index("--vocab-size"):real.index("--vocab-size") + 2] = []
    real[real.index("--train-iters") + 1] = "100"
    proc = subprocess.run([sys.executable, "pretrain_gpt.py", *real, "--tokenizer-type", "Llama2Tokenizer",
                           "--tokenizer-model", str(run_dir / "tok.model"), "--data-path",
                           str(run_dir / "corpus_text_document"), "--split", "98,2,0", "--log-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    values = losses(tmp_path)
    assert len(values) == 100 and sum(values[-10:]) / 10 < sum(values[:10]) / 10 - 0.5



@pytest.mark.parametrize("script", ["examples/deepseek/train_deepseek_like.sh", "examples/fairseq/train_fairseq_moe.sh"])
def test_example_scripts_run_tiny(tmp_path, script):
    sizes = dict(NUM_LAYERS="4", HIDDEN_SIZE="64", SEQ_LENGTH="32", NUM_EXPERTS="8", MOE_FFN="32", SHARED_FFN="64",
                 GLOBAL_BATCH_SIZE="4", TRAIN_ITERS="2", LR_WARMUP_ITERS="1", LOG_INTERVAL="1", EVAL_INTERVAL="2",
                 PYTHON=sys.executable)
    proc = subprocess.run(["bash", script, "--log-dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**ENV, **sizes})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses(tmp_path)) == 2


def test_missing_files_fail_on_every_rank_before_any_collective(tmp_path):
    real = [a for a in TINY if a != "--mock-data"]
    for extra, needle in ((["--data-path", str(tmp_path / "nothing")], "--data-path: "),
                          (["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(tmp_path / "no.model"),
                            "--data-path", str(tmp_path / "nothing")], "--tokenizer-model")):
        for proc in run_ranks(2, [sys.executable, "pretrain_gpt.py", *real, *extra]):
            assert proc.returncode == 2 and needle in proc.stderr and "does not exist" in proc.stderr
