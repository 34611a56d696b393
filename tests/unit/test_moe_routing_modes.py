"""Sinkhorn, expert choice, fairseq's second-expert policies, jitter, expert bias and evaluation capacity."""

import math
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from megamoe.moe.config import MoEConfig
from megamoe.moe.router import TopKRouter, sinkhorn
from megamoe.parallel.group import AxisGroup
from megamoe.tensor_parallel.random import DropoutContext

ONE = AxisGroup("tp", (0,), 0)


def router(hidden=3, **kw):
    moe = MoEConfig(**{"num_experts": 4, "router_topk": 2, **kw})
    return TopKRouter(hidden, moe, ONE, False, 0.02, layer_number=5)


def test_sinkhorn_is_doubly_stochastic():
    g = torch.Generator().manual_seed(0)
    out = sinkhorn(torch.randn(50, 8, generator=g, dtype=torch.float64) * 3, tol=1e-10)
    assert torch.allclose(out.sum(1), torch.full((50,), 1 / 50, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(out.sum(0), torch.full((8,), 1 / 8, dtype=torch.float64), atol=1e-9)


def test_sinkhorn_routing_balances_in_training_only():
    # Every token prefers expert 0; the balanced assignment spreads them, evaluation follows the raw scores.
    logits = torch.tensor([[4.0, 1.0, 0.0, 0.0]] * 8) + torch.arange(8.0).unsqueeze(1) * 0.01 * torch.tensor([0, 1, 2, 3.0])
    r = router(router_topk=1, load_balancing_type="sinkhorn")
    probs, routing_map, _ = r.sinkhorn_routing(logits)
    assert routing_map.sum(0).max() < 8 and routing_map.sum(1).tolist() == [1] * 8
    chosen = routing_map.float().argmax(1)
    assert torch.allclose(probs[torch.arange(8), chosen], torch.sigmoid(logits[torch.arange(8), chosen]))
    r.eval()
    assert r.sinkhorn_routing(logits)[1][:, 0].all()


def test_expert_choice_by_hand():
    with pytest.warns(UserWarning, match="non-causal"):
        r = router(router_type="expert_choice", router_topk=1, num_experts=2)
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    probs, routing_map, scores = r.expert_choice(logits)  # capacity = ceil(4 * 1 / 2) = 2 per expert
    assert routing_map[:, 0].tolist() == [True, True, False, False]
    assert routing_map[:, 1].tolist() == [False, False, True, True]  # token 3 ties token 1 (0.5); 3 scores more
    assert torch.equal(probs, scores * routing_map)


def test_second_expert_policy_all_is_plain_top2():
    logits = torch.randn(20, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(router(second_expert_policy="all").scores_and_topk(logits)[1],
                       router().scores_and_topk(logits)[1])


def _routing(r, logits_row, n):
    # n tokens with the same logits, each with its own random draws (sample ids 0..n-1, one position).
    r.weight.data = torch.eye(4, 3)
    tokens = torch.zeros(n, 3)
    tokens[:, :3] = logits_row[:3]
    return r(tokens, batch=n, ctx=DropoutContext(seed=11, sample_ids=torch.arange(n)))


def test_second_expert_sampling_follows_the_softmax_of_the_others():
    r = router(second_expert_policy="sampling")
    logits = torch.tensor([2.0, 1.0, 0.0, 0.0])  # router weight eye(4, 3): expert 3 gets logit 0 too
    routing = _routing(r, logits, 20000)
    first = routing.routing_map[:, 0]
    assert first.all()  # the argmax is always kept
    second = routing.routing_map[:, 1:].float().mean(0)
    expected = torch.softmax(logits[1:], 0)
    assert torch.allclose(second, expected, atol=0.015)


def test_second_expert_random_keeps_with_probability_two_p2():
    r = router(second_expert_policy="random")
    logits = torch.tensor([1.0, 0.5, -3.0, -3.0])
    routing = _routing(r, logits, 20000)
    p2 = torch.softmax(torch.tensor([1.0, 0.5]), 0)[1].item()  # weight of the second of the pair
    kept = routing.routing_map[:, 1].float().mean().item()
    assert kept == pytest.approx(min(1.0, 2 * p2), abs=0.015)
    r.eval()
    assert _routing(r, logits, 10).routing_map[:, 1].all()  # evaluation keeps both


def test_input_jitter_multiplies_within_eps_and_only_in_training():
    r = router(input_jitter_eps=0.1)
    r.weight.data = torch.eye(4, 3)
    tokens = torch.ones(6, 3)
    ctx = DropoutContext(seed=1, sample_ids=torch.arange(2))
    logits_train = r(tokens, batch=2, ctx=ctx).stats["scores"]
    r.eval()
    logits_eval = r(tokens, batch=2, ctx=ctx).stats["scores"]
    assert not torch.equal(logits_train, logits_eval)


def test_expert_bias_selects_and_updates_once_per_forward_even_with_recomputation():
    r = router(router_score_function="sigmoid", router_enable_expert_bias=True, router_bias_update_rate=0.1)
    r.weight.data = torch.zeros(4, 3)
    r.expert_bias[3] = 1.0  # equal scores: the bias alone decides
    tokens = torch.randn(5, 3, requires_grad=True)
    out = checkpoint(lambda t: r(t, batch=5).probs, tokens, use_reentrant=False)
    out.sum().backward()  # recomputes the forward inside backward
    routing = r(tokens.detach(), batch=5)
    assert routing.routing_map[:, 3].all() and routing.routing_map[:, 0].all()  # bias 1 on expert 3, ties -> 0
    assert r.routed_counts.tolist() == [10, 0, 0, 10]  # two forwards counted, the recomputation not
    assert torch.equal(routing.probs[0, 3], routing.probs[0, 0])  # weights come from unbiased scores
    r.update_expert_bias(ONE)
    assert r.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.9])  # sign(mean 5 - count) * rate
    assert r.routed_counts.sum() == 0


def test_eval_capacity_token_fraction():
    moe = MoEConfig(num_experts=4, expert_capacity_factor=2.0, eval_capacity_token_fraction=0.25)
    assert moe.capacity(40, training=False) == 10 and moe.capacity(40, training=True) == 40
    r = router(eval_capacity_token_fraction=0.25)
    r.weight.data = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 0]])
    r.eval()
    tokens = torch.randn(16, 3, generator=torch.Generator().manual_seed(4))
    routing = r(tokens, batch=4)
    routed, kept = routing.stats["routed"], routing.stats["kept"]
    per_expert = routed.sum(0)
    expected_kept = torch.minimum(per_expert, torch.tensor(4)).sum()  # capacity ceil(0.25 * 16) = 4
    assert kept.sum() == expected_kept
    assert math.isclose(1 - kept.sum().item() / routed.sum().item(), 1 - expected_kept.item() / 32)


def test_expert_choice_rejects_clashing_options():
    with warnings.catch_warnings(), pytest.raises(ValueError, match="expert_choice cannot be combined"):
        warnings.simplefilter("ignore")
        MoEConfig(num_experts=4, router_type="expert_choice", router_num_groups=2, router_group_topk=1)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(router_enable_expert_bias=True), "--moe-router-enable-expert-bias needs --moe-router-score-function"),
    (dict(second_expert_policy="random", router_topk=1), "fairseq's top-2 gating"),
    (dict(load_balancing_type=("sinkhorn", "aux_loss")), "sinkhorn balances by itself"),
    (dict(eval_capacity_token_fraction=1.5), "--moe-eval-capacity-token-fraction must be in (0, 1]"),
])
def test_invalid_routing_options(kwargs, needle):
    with pytest.raises(ValueError) as info:
        MoEConfig(num_experts=4, **kwargs)
    assert needle in str(info.value)


def test_global_aux_loss_by_hand_and_step_accumulation():
    from megamoe.moe.losses import global_aux_loss, switch_aux_loss

    scores = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    load = torch.tensor([3.0, 1.0])
    # E / (T^2 k) sum_e P_e load_e with T = 4 step-wide tokens: 2 / 16 * (1.1 * 3 + 0.9 * 1)
    assert global_aux_loss(scores, load, 4, 1).item() == pytest.approx(2 / 16 * (1.1 * 3 + 0.9 * 1))
    # with the load of this group alone and T = N it is the ordinary aux loss
    routing_map = torch.tensor([[True, False], [False, True]])
    assert global_aux_loss(scores, routing_map.sum(0), 2, 1).item() == pytest.approx(
        switch_aux_loss(scores, routing_map, 1).item())

    r = TopKRouter(3, MoEConfig(num_experts=4, load_balancing_type="global_aux_loss", aux_loss_coeff=1.0), ONE,
                   False, 0.02, dp_group=ONE)
    tokens = torch.randn(6, 3, generator=torch.Generator().manual_seed(5))
    first = r(tokens, batch=2).routing_map.sum(0)
    second = r(tokens.flip(0), batch=2).routing_map.sum(0)
    assert r.step_micro_batches == 2 and torch.equal(r.step_load, (first + second).float())
    r.reset_step_load()
    assert r.step_micro_batches == 0 and r.step_load.sum() == 0
