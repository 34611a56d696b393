"""tools/eval_lm.py: the perplexity of a trained checkpoint equals exp(mean token loss) from an independent
forward in this process, and is the same under tp2 (+SP), ep2 and dp2; per-token log-probabilities; the dropped
fraction at an evaluation capacity equals a direct computation; bad input."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests import entry_points
from tests.e2e.test_pretrain import TINY

VOCAB, SEQ = 512, 32
MODEL = [a for a in TINY if a not in ("--mock-data",)]




@pytest.fixture(scope="module")
def trained(dist_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    g = torch.Generator().manual_seed(3)
    with open(root / "docs.jsonl", "w") as f:  # 20 documents of random ids (NullTokenizer text)
        for _ in range(20):
            ids = torch.randint(0, VOCAB - 1, (int(torch.randint(5, 60, (1,), generator=g)),), generator=g)
            f.write(json.dumps({"text": " ".join(map(str, ids.tolist()))}) + "\n")
    dist_run(1, entry_points.pretrain,
             TINY + ["--train-iters", "3", "--save", str(root / "ckpt"), "--log-dir", str(root)])
    return root


def _reference(root, fraction=None):
    """Token-weighted loss and drop counts of an independent single-process forward over the same windows."""
    from megamoe.checkpoint.checkpointer import CheckpointConfig, find_checkpoint, load_checkpoint
    from megamoe.checkpoint.hf import model_config_from_dict
    from megamoe.model.gpt import GPTModel
    from megamoe.parallel.config import ParallelConfig
    from megamoe.parallel.mesh import ParallelMesh

    found = find_checkpoint(CheckpointConfig(load=str(root / "ckpt")))
    config = model_config_from_dict(found.common["model"])
    if fraction is not None:  # the drops of a layer change the next layer's inputs: evaluate with the capacity
        config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, eval_capacity_token_fraction=fraction))
    mesh = ParallelMesh(ParallelConfig(world_size=1), standalone=True)
    model = GPTModel(config, mesh).eval()
    load_checkpoint(found, [model], None, mesh)
    stream = []
    for line in open(root / "docs.jsonl"):
        stream += [int(t) for t in json.loads(line)["text"].split()] + [VOCAB - 1]
    stream = torch.tensor(stream)
    inputs = []
    routed = {}
    for layer in [m for m in model.modules() if type(m).__name__ == "TopKRouter"]:
        layer.register_forward_pre_hook(lambda mod, args: inputs.append((mod.layer_number, args[0].detach())))
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, SEQ):
            window = stream[start:start + SEQ + 1]
            real = len(window) - 1
            # the last window is padded with eod to SEQ positions, as the evaluation's is (padding is routed too)
            padded = torch.cat([window[:-1], torch.full((SEQ - real,), VOCAB - 1)])
            logits = model(padded.unsqueeze(0))[0, :real, :VOCAB]
            loss_sum += F.cross_entropy(logits.double(), window[1:], reduction="sum").item()
            tokens += real
    if fraction is not None:  # fairseq's capacity: ceil(fraction x tokens) per expert; the top C by probability
        for n, x in inputs:
            router = next(m for m in model.modules() if type(m).__name__ == "TopKRouter" and m.layer_number == n)
            logits = F.linear(x, router.weight)  # as the router computes them (same summation order)
            chosen = logits.topk(2, dim=-1).indices
            counts = torch.bincount(chosen.flatten(), minlength=4)
            capacity = math.ceil(fraction * x.shape[0])
            total = routed.setdefault(n, [0, 0])
            total[0] += counts.sum().item()
            total[1] += counts.clamp_max(capacity).sum().item()
    return loss_sum / tokens, tokens, routed


LAYOUTS = {
    "one rank": (1, []),
    "tp2 sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "ep2": (2, ["--expert-model-parallel-size", "2"]),
    "dp2": (2, []),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_perplexity_equals_an_independent_forward(dist_run, trained, tmp_path, layout):
    world, flags = LAYOUTS[layout]
    loss, tokens, _ = _reference(trained)
    argv = ["--load", str(trained / "ckpt"), "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
            "--eval-text", str(trained / "docs.jsonl"), "--micro-batch-size", "2", "--full-validation",
            "--output-json", str(tmp_path / "result.json"), "--output-word-probs", str(tmp_path / "probs.jsonl"),
            *flags]
    assert dist_run(world, entry_points.eval_lm, argv) == [0] * world
    result = json.load(open(tmp_path / "result.json"))
    assert result["tokens"] == tokens
    assert abs(result["loss"] - loss) <= 1e-5 * loss
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    probs = [json.loads(line) for line in open(tmp_path / "probs.jsonl")]
    assert sum(len(p["logprobs"]) for p in probs) == tokens
    assert -sum(sum(p["logprobs"]) for p in probs) / tokens == pytest.approx(loss, rel=1e-5)


def test_evaluation_capacity_drops_as_computed(dist_run, trained, tmp_path):
    _, _, routed = _reference(trained, fraction=0.3)
    argv = ["--load", str(trained / "ckpt"), "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
            "--eval-text", str(trained / "docs.jsonl"), "--micro-batch-size", "1", "--full-validation",
            "--moe-eval-capacity-token-fraction", "0.3", "--output-json", str(tmp_path / "result.json")]
    assert dist_run(1, entry_points.eval_lm, argv) == [0]
    moe = json.load(open(tmp_path / "result.json"))["moe"]
    assert sorted(moe) == [str(n) for n in sorted(routed)]
    for n, (total, kept) in routed.items():
        assert moe[str(n)]["dropped_fraction"] == pytest.approx(1 - kept / total, abs=1e-6)
        assert 0 < moe[str(n)]["dropped_fraction"]


def test_bad_input(dist_run, trained, tmp_path, capsys):
    base = ["--tokenizer-type", "NullTokenizer", "--micro-batch-size", "1"]
    assert entry_points.eval_lm([*base, "--vocab-size", str(VOCAB), "--load", str(tmp_path / "none"), "--eval-text",
                  str(trained / "docs.jsonl")]) == 2
    assert "--load" in capsys.readouterr().err
    assert entry_points.eval_lm([*base, "--vocab-size", "100", "--load", str(trained / "ckpt"), "--eval-text",
                  str(trained / "docs.jsonl")]) == 2
    assert "the tokenizer has 100 tokens but the checkpoint's model 512" in capsys.readouterr().err
    assert entry_points.eval_lm([*base, "--vocab-size", str(VOCAB), "--load", str(trained / "ckpt"), "--eval-text",
                  str(tmp_path / "absent.jsonl")]) == 2
    assert "--eval-text" in capsys.readouterr().err


def test_data_path_split_and_profile(dist_run, trained, tmp_path):
    import numpy as np

    from megamoe.data.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "docs.bin"), dtype=np.uint16)
    total = 0
    for line in open(trained / "docs.jsonl"):
        ids = [int(t) for t in json.loads(line)["text"].split()] + [VOCAB - 1]
        builder.add_document(ids, [len(ids)])
        total += len(ids)
    builder.finalize(str(tmp_path / "docs.idx"))
    argv = ["--load", str(trained / "ckpt"), "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
            "--data-path", str(tmp_path / "docs"), "--split", "0,1,0", "--micro-batch-size", "2", "--num-workers",
            "0", "--full-validation", "--output-json", str(tmp_path / "result.json"), "--profile", "--profile-dir",
            str(tmp_path / "profile"), "--expert-model-parallel-size", "2"]
    assert dist_run(2, entry_points.eval_lm, argv) == [0, 0]
    result = json.load(open(tmp_path / "result.json"))
    assert result["tokens"] == (total - 1) // SEQ * SEQ  # one epoch of the split, Megatron's sample count
    assert 3 < result["loss"] < 8
    summary = (tmp_path / "profile" / "rank0.summary.txt").read_text()
    assert "layer   0  comm.all_gather.tp_ep" in summary  # the allgather dispatcher's exchange, by layer
