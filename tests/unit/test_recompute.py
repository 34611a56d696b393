"""Activation recomputation (--recompute-granularity full|selective) changes nothing but memory: losses, every
gradient, routing statistics and expert-bias counts equal the run without it, and the layers really run twice."""

import dataclasses

import pytest
import torch

from megamoe.model.config import ModelConfig
from megamoe.model.gpt import GPTModel, recompute_plan
from megamoe.moe.config import MoEConfig
from megamoe.moe.layer import moe_layers
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.mesh import ParallelMesh
from tests.model_cases import VARIANTS, batch, make_config

MOE = MoEConfig(num_experts=4, router_topk=2, aux_loss_coeff=0.01, z_loss_coeff=1e-3,
                router_enable_expert_bias=True, router_score_function="sigmoid")


def _run(**recompute):
    cfg = make_config(**VARIANTS["mixtral"], moe=MOE, num_layers=3, hidden_dropout=0.1, attention_dropout=0.1,
                      **recompute)
    model = GPTModel(cfg, ParallelMesh(ParallelConfig(world_size=1)), seed=5).train()
    calls = []
    for layer in moe_layers(model):
        layer.register_forward_hook(lambda *_: calls.append(1))
    ids, labels = batch(cfg, b=3)
    loss = model(ids, labels=labels, sample_ids=torch.tensor([4, 5, 6]))
    loss.mean().backward()
    counts = torch.stack([layer.router.routed_counts for layer in moe_layers(model)])
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, counts, len(calls)


@pytest.mark.parametrize("recompute, forwards", [
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2), 6),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1), 4),
    (dict(recompute_granularity="selective"), 3),
])
def test_recomputation_changes_no_value(recompute, forwards):
    loss, grads, counts, calls = _run()
    loss_r, grads_r, counts_r, calls_r = _run(**recompute)
    assert calls == 3 and calls_r == forwards  # the recomputed layers' forward ran again in backward
    assert torch.equal(loss, loss_r)
    assert torch.equal(counts, counts_r)  # expert-bias load counted once
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_recompute_plan_follows_megatron():
    cfg = make_config(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)
    assert recompute_plan(cfg, 5) == [(range(0, 2), True), (range(2, 4), True), (range(4, 5), True)]
    cfg = dataclasses.replace(cfg, recompute_method="block", recompute_num_layers=2)
    assert recompute_plan(cfg, 5) == [(range(0, 1), True), (range(1, 2), True), (range(2, 5), False)]
    assert recompute_plan(dataclasses.replace(cfg, recompute_num_layers=9), 2)[-1] == (range(2, 2), False)
    assert recompute_plan(make_config(), 3) == [(range(3), False)]


@pytest.mark.parametrize("recompute, message", [
    (dict(recompute_granularity="full"), "needs --recompute-method"),
    (dict(recompute_granularity="selective", recompute_method="block", recompute_num_layers=1), "full only"),
    (dict(recompute_granularity="partial"), "full or selective"),
])
def test_bad_recompute_flags(recompute, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=100, **recompute)
