"""What a run writes besides its log lines: metrics.jsonl with every pipeline stage's MoE layers, TensorBoard
scalars, an offline wandb run, a profiler trace, and the batch-size ramp-up in the logged batch sizes."""

import json
import os

import pytest

from tests.e2e.test_pretrain import records, run

FOUR_RANKS = ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("logging")
    env = {"WANDB_API_KEY": "", "WANDB_SILENT": "true"}
    proc = run(4, [*FOUR_RANKS, "--moe-z-loss-coeff", "1e-3", "--train-iters", "6", "--global-batch-size", "8",
                   "--rampup-batch-size", "4", "4", "16", "--eval-interval", "3", "--eval-iters", "1", "--tensorboard-dir", str(root / "tb"),
                   "--wandb-project", "megamoe-test", "--wandb-exp-name", "tiny", "--profile",
                   "--profile-step-start", "2", "--profile-step-end", "3", "--profile-ranks", "0", "3"],
               root, extra_env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


def test_metrics_jsonl_has_every_stage_moe_layers_and_the_rampup(logged_run):
    root, proc = logged_run
    assert "| load_balancing_loss: " in proc.stdout and "| z_loss: " in proc.stdout  # Megatron's MoE loss fields
    train = records(root)
    assert [r["global batch size"] for r in train] == [4, 4, 4, 4, 8, 8]  # 4 until more than 16 samples are consumed
    assert [r["consumed samples"] for r in train] == [4, 8, 12, 16, 24, 32]
    for r in train:
        assert sorted(r["moe"]) == ["0", "1", "2", "3"]  # layers 0-1 on stage 0, 2-3 on stage 1
        for layer in r["moe"].values():
            # the last micro-batch of each of the 2 data-parallel replicas: 2 samples x 32 tokens x top-2, summed
            assert sum(layer["tokens_per_expert"]) == 2 * (2 * 32 * 2)
    assert [r["iteration"] for r in records(root, "valid")] == [3, 6, 6]  # every 3 iterations, and at the end
    assert [r["iteration"] for r in records(root, "test")] == [6]


def test_tensorboard_has_the_scalars(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = logged_run
    events = EventAccumulator(str(root / "tb")).Reload()
    tags = events.Tags()["scalars"]
    for tag in ("lm loss", "learning rate", "grad norm", "global batch size", "lm loss valid", "moe/layer3/entropy",
                "load_balancing_loss", "z_loss", "moe/layer1/z_loss",
                "moe/layer0/tokens_per_expert/expert3"):
        assert tag in tags, tag
    assert [e.step for e in events.Scalars("lm loss")] == [1, 2, 3, 4, 5, 6]
    first = json.loads(next(open(root / "metrics.jsonl")))
    assert events.Scalars("lm loss")[0].value == pytest.approx(first["lm loss"], rel=1e-6)


def test_wandb_runs_offline_without_a_key(logged_run):
    root, _ = logged_run
    runs = list((root / "wandb").glob("wandb/offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_profiler_traces_the_chosen_steps_on_the_chosen_ranks(logged_run):
    root, proc = logged_run
    profile = root / "tb" / "profile"
    assert sorted(os.listdir(profile)) == ["rank0.pt.trace.json", "rank0.summary.txt", "rank3.pt.trace.json",
                                          "rank3.summary.txt"]
    trace = json.load(open(profile / "rank0.pt.trace.json"))
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("aten::mm" in n or "aten::addmm" in n for n in names)
    assert "Self CPU" in open(profile / "rank3.summary.txt").read()
