"""The two loss modes of the schedules against a hand computation with torch's cross entropy (one process)."""

import pytest
import torch
import torch.nn.functional as F

from megamoe.distributed.finalize import finalize_grads
from megamoe.model.gpt import GPTModel
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.mesh import ParallelMesh
from megamoe.pipeline.schedules import get_forward_backward_func
from tests.model_cases import SEED, VARIANTS, make_config


def batches(cfg, n):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        out.append(dict(tokens=torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=g),
                        labels=torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=g),
                        loss_mask=(torch.rand(2, cfg.seq_length, generator=g) > 0.3).float()))
    return out


@pytest.mark.parametrize("per_token", [False, True])
def test_loss_modes_by_hand(per_token):
    cfg = make_config(**VARIANTS["mixtral"])
    mesh = ParallelMesh(ParallelConfig(world_size=1))
    model = GPTModel(cfg, mesh, seed=SEED)
    data = batches(cfg, 3)
    schedule = get_forward_backward_func(mesh)
    out = schedule([model], iter(data), mesh, num_microbatches=3, seq_length=cfg.seq_length, micro_batch_size=2,
                   per_token_loss=per_token)
    finalize_grads([model], mesh, out.num_tokens() if per_token else None)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    # By hand: torch's cross entropy on the real vocabulary, masked.
    model.zero_grad()
    sums, counts = [], []
    for b in data:
        logits = model(b["tokens"])[..., :cfg.vocab_size]
        ce = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), b["labels"].reshape(-1), reduction="none")
        sums.append((ce * b["loss_mask"].reshape(-1)).sum())
        counts.append(b["loss_mask"].sum())
    loss = sum(sums) / sum(counts) if per_token else sum(s / n for s, n in zip(sums, counts)) / 3
    loss.backward()
    reported = sum(s for s, _ in out.losses) / sum(n for _, n in out.losses) if per_token else out.mean_loss()
    assert float(reported) == pytest.approx(loss.item(), rel=1e-5)
    for name, param in model.named_parameters():
        assert ((got[name] - param.grad).norm() / param.grad.norm()).item() < 1e-5, name


def test_wrong_micro_batch_shape_names_the_flags():
    cfg = make_config(**VARIANTS["mixtral"])
    mesh = ParallelMesh(ParallelConfig(world_size=1))
    model = GPTModel(cfg, mesh, seed=SEED)
    with pytest.raises(ValueError, match="--micro-batch-size 4 and --seq-length 8"):
        get_forward_backward_func(mesh)([model], iter(batches(cfg, 1)), mesh, num_microbatches=1, seq_length=8,
                                        micro_batch_size=4)
