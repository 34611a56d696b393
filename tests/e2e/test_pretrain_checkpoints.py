"""pretrain_gpt.py and checkpoints as a user meets them: a rank killed with SIGKILL in the middle of a save leaves
the previous checkpoint loadable, resuming names the partial save and continues; bad --load input fails on every
rank before any collective."""

import signal
import subprocess
import sys
import time

from megamoe.parallel.world import free_port
from tests.e2e.ranks import run_ranks
from tests.e2e.test_pretrain import ENV, TINY, losses, run

TWO_RANKS = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]


def _start_ranks(nproc, argv):
    port = free_port()
    return [subprocess.Popen([sys.executable, "pretrain_gpt.py", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**ENV, "RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(r),
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            for r in range(nproc)]


def test_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    procs = _start_ranks(2, [*TINY, *TWO_RANKS, "--train-iters", "1000", "--save", str(ckpt), "--save-interval", "1",
                             "--log-dir", str(tmp_path / "first")])
    # Wait until a save after the first published one is in flight, then SIGKILL rank 1 in the middle of it.
    deadline, partial = time.time() + 180, None
    while time.time() < deadline and partial is None:
        if (ckpt / "latest_checkpointed_iteration.txt").exists():
            partial = next((p for p in ckpt.glob("iter_*.tmp") if any(p.iterdir())), None)
    assert partial is not None, "no save was caught in flight"
    procs[1].send_signal(signal.SIGKILL)
    procs[0].kill()  # what torchrun does to the other ranks when one dies
    for p in procs:
        p.communicate(timeout=60)
    published = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert (ckpt / f"iter_{published:07d}" / "common.json").exists()

    resumed = run(2, [*TWO_RANKS, "--load", str(ckpt), "--train-iters", str(published + 2)], tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if partial.exists():  # the killed save was not published: it is named and skipped
        assert f"ignoring {partial}: a save that did not finish" in resumed.stdout
    assert f"loaded checkpoint {ckpt / f'iter_{published:07d}'} at iteration {published}" in resumed.stdout
    assert len(losses(tmp_path / "resumed")) == 2


def test_bad_load_input_fails_on_every_rank_before_any_collective(tmp_path):
    saved = run(1, ["--train-iters", "2", "--save", str(tmp_path / "ckpt")], tmp_path / "first")
    assert saved.returncode == 0, saved.stderr[-2000:]
    cases = (
        (["--load", str(tmp_path / "absent")], "--load {}/absent does not exist"),
        (["--load", str(tmp_path / "first")], "has no latest_checkpointed_iteration.txt"),
        (["--load", str(tmp_path / "ckpt"), "--hidden-size", "32"], "does not match the model of the flags"),
        (["--load", str(tmp_path / "ckpt"), "--ckpt-step", "7"], "iter_0000007 is missing or incomplete"),
        (["--fp16", "--bf16"], "--fp16 and --bf16 exclude each other"),
    )
    for extra, needle in cases:
        for proc in run_ranks(2, [sys.executable, "pretrain_gpt.py", *TINY, *extra]):
            assert proc.returncode == 2, (extra, proc.stderr[-2000:])
            assert needle.format(tmp_path) in proc.stderr, (extra, proc.stderr[-2000:])
    # the checkpoint's 4 experts cannot be split over 3 expert-parallel ranks
    for proc in run_ranks(3, [sys.executable, "pretrain_gpt.py", *TINY, "--load", str(tmp_path / "ckpt"),
                              "--expert-model-parallel-size", "3"]):
        assert proc.returncode == 2 and "--num-experts 4" in proc.stderr, proc.stderr[-2000:]


def test_dist_mmap_trains_on_the_same_samples(tmp_path):
    import numpy as np

    from megamoe.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(tmp_path / "corpus.bin"), dtype=np.uint16)
    for _ in range(300):
        doc = rng.integers(1, 500, rng.integers(5, 80))
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(tmp_path / "corpus.idx"))
    real = [a for a in TINY if a != "--mock-data"] + ["--tokenizer-type", "NullTokenizer", "--data-path",
                                                      str(tmp_path / "corpus"), "--train-iters", "4",
                                                      "--split", "1,0,0"]
    results = []
    for name, extra in (("full", []), ("shards", ["--dist-mmap"])):
        proc = run_ranks(2, [sys.executable, "pretrain_gpt.py", *real, *extra, "--log-dir", str(tmp_path / name)])
        assert all(p.returncode == 0 for p in proc), [p.stderr[-2000:] for p in proc]
        results.append(losses(tmp_path / name))
    assert len(results[0]) == 4 and results[0] == results[1]
    assert list((tmp_path / "cache" / "GPTDataset_indices").glob("*-dp1of2-mbs2.offsets.npy"))


def test_moe_use_upcycling_starts_from_the_dense_model(tmp_path):
    dense_flags = [a for a in TINY]
    at = dense_flags.index("--num-experts")
    del dense_flags[at:at + 6]  # --num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 0.01
    assert "--moe-router-topk" not in dense_flags

    def pretrain(nproc, extra, log_dir):
        procs = run_ranks(nproc, [sys.executable, "pretrain_gpt.py", *extra, "--log-dir", str(log_dir)])
        assert all(p.returncode == 0 for p in procs), procs[-1].stderr[-3000:]
        return procs[-1].stdout

    pretrain(1, [*dense_flags, "--train-iters", "2", "--save", str(tmp_path / "dense")], tmp_path / "d1")
    # the dense model's loss on the first batch, after its 2 iterations (--finetune: iteration 0, batch 0)
    pretrain(1, [*dense_flags, "--train-iters", "1", "--load", str(tmp_path / "dense"), "--finetune"], tmp_path / "d2")
    out = pretrain(2, [*TINY, "--expert-model-parallel-size", "2", "--train-iters", "1", "--moe-use-upcycling",
                       "--load", str(tmp_path / "dense"), "--save", str(tmp_path / "moe")], tmp_path / "moe-log")
    assert f"upcycled {tmp_path / 'dense' / 'iter_0000002'} into {tmp_path / 'moe' / 'iter_0000000'}" in out
    dense_loss, moe_loss = losses(tmp_path / "d2")[0], losses(tmp_path / "moe-log")[0]
    assert abs(dense_loss - moe_loss) <= 1e-5 * dense_loss
    # a second start resumes the MoE checkpoint instead of upcycling again
    out = pretrain(2, [*TINY, "--expert-model-parallel-size", "2", "--train-iters", "2", "--moe-use-upcycling",
                       "--load", str(tmp_path / "dense"), "--save", str(tmp_path / "moe")], tmp_path / "moe-log2")
    assert "upcycled" not in out and f"loaded checkpoint {tmp_path / 'moe' / 'iter_0000001'}" in out
