"""MoE pieces against hand-worked examples and direct computation (single process)."""

import math

import pytest
import torch

from megamoe.moe.capacity import apply_capacity
from megamoe.moe.config import MoEConfig
from megamoe.model.config import ModelConfig
from megamoe.moe import experts as experts_module
from megamoe.moe.experts import GroupedExperts, available_backends, grouped_linear, padded_layout
from megamoe.moe.losses import attach_aux_loss, sequence_aux_loss, switch_aux_loss, z_loss
from megamoe.moe.metrics import routing_metrics
from megamoe.moe.permute import expert_order, permute, unpermute
from megamoe.moe.router import TopKRouter
from megamoe.parallel.group import AxisGroup

ONE = AxisGroup("tp", (0,), 0)


def router(**kw):
    moe = MoEConfig(**{"num_experts": 4, "router_topk": 2, **kw})
    return TopKRouter(3, moe, ONE, False, 0.02)


LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0],
                       [0.0, 0.0, 3.0, 0.0],     # a tie between experts 0, 1 and 3 for the second place
                       [1.0, 2.0, 2.0, 0.5]])    # a tie for first place


def test_topk_softmax_after_selection_by_hand():
    probs, routing_map, scores = router().scores_and_topk(LOGITS)
    assert routing_map.tolist() == [[True, True, False, False],
                                    [True, False, True, False],   # ties go to the lower expert index
                                    [False, True, True, False]]
    e = math.exp(1.0)
    assert probs[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1), 0, 0])  # softmax over the two chosen
    assert probs[2].tolist() == pytest.approx([0, 0.5, 0.5, 0])
    assert scores[0].tolist() == pytest.approx(torch.softmax(LOGITS[0], -1).tolist())


def test_topk_pre_softmax_and_scaling_by_hand():
    probs, _, _ = router(router_pre_softmax=True, router_topk_scaling_factor=2.0).scores_and_topk(LOGITS)
    full = torch.softmax(LOGITS[0], -1)
    assert probs[0].tolist() == pytest.approx([2 * full[0].item(), 2 * full[1].item(), 0, 0])


def test_topk_sigmoid_normalizes_the_chosen_scores():
    probs, routing_map, _ = router(router_score_function="sigmoid").scores_and_topk(LOGITS)
    s = torch.sigmoid(LOGITS[0])
    assert probs[0].tolist() == pytest.approx([(s[0] / (s[0] + s[1])).item(), (s[1] / (s[0] + s[1])).item(), 0, 0])
    assert router(router_score_function="sigmoid", router_topk=1).scores_and_topk(LOGITS)[0][1, 2] == \
        pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())


def test_group_limited_routing_by_hand():
    # 4 experts in 2 groups {0,1}, {2,3}; one group per token, 2 experts from it.
    logits = torch.tensor([[3.0, -5.0, 2.0, 2.0]])  # group scores: 3 - 5 = -2 vs 2 + 2 = 4 -> group {2, 3}
    _, routing_map, _ = router(router_num_groups=2, router_group_topk=1).scores_and_topk(logits)
    assert routing_map.tolist() == [[False, False, True, True]]
    _, plain, _ = router().scores_and_topk(logits)
    assert plain.tolist() == [[True, False, True, False]]


def test_aux_loss_by_hand_and_gradient():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], requires_grad=True)
    routing_map = torch.tensor([[True, True, False], [False, True, True]])
    # E / (N^2 k) * sum_e P_e c_e = 3 / (4 * 2) * (0.8 * 1 + 0.8 * 2 + 0.4 * 1)
    loss = switch_aux_loss(scores, routing_map, topk=2)
    assert loss.item() == pytest.approx(3 / 8 * (0.8 + 1.6 + 0.4))
    loss.backward()
    for row in scores.grad.tolist():  # d/dp_te = E / (N^2 k) * c_e
        assert row == pytest.approx([3 / 8 * 1, 3 / 8 * 2, 3 / 8 * 1])


def test_sequence_aux_loss_is_the_mean_of_per_sequence_losses():
    g = torch.Generator().manual_seed(0)
    s, b, e = 5, 3, 4
    scores = torch.rand(s * b, e, generator=g).softmax(-1)
    routing_map = torch.rand(s * b, e, generator=g) > 0.5
    per_seq = [switch_aux_loss(scores.view(s, b, e)[:, i], routing_map.view(s, b, e)[:, i], 2) for i in range(b)]
    assert sequence_aux_loss(scores, routing_map, 2, b).item() == pytest.approx(sum(per_seq).item() / b)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_aux_loss_scaler_adds_the_gradient_without_changing_the_output():
    x = torch.ones(3, requires_grad=True)
    aux = (x * 2).sum()
    y = attach_aux_loss(x * 1.0, aux, 0.5)
    assert torch.equal(y, x)
    y.sum().backward()
    assert x.grad.tolist() == [1 + 0.5 * 2] * 3


def test_capacity_policies_by_hand():
    probs = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.5, 0.5]])
    routing_map = torch.tensor([[True, True], [True, False], [True, False], [False, True]])
    # capacity 2: expert 0 has tokens 0, 1, 2
    p, kept = apply_capacity(probs, routing_map, 2, "probs", pad=False)
    assert kept[:, 0].tolist() == [False, True, True, False] and kept[:, 1].tolist() == [True, False, False, True]
    assert p[0, 0] == 0 and p[1, 0] == 0.9
    _, kept = apply_capacity(probs, routing_map, 2, "position", pad=False)
    assert kept[:, 0].tolist() == [True, True, False, False]
    # padding: expert 1 has two routed tokens already; with capacity 3 the earliest unrouted token (1) pads it
    p, kept = apply_capacity(probs, routing_map, 3, "probs", pad=True)
    assert kept.sum(0).tolist() == [3, 3] and kept[1, 1] and p[1, 1] == 0
    # equal probabilities: the earlier token wins
    tie = torch.tensor([[0.5], [0.5], [0.5]])
    _, kept = apply_capacity(tie, torch.ones(3, 1, dtype=torch.bool), 2, "probs", pad=False)
    assert kept[:, 0].tolist() == [True, True, False]


def test_capacity_formula():
    moe = MoEConfig(num_experts=8, router_topk=2, expert_capacity_factor=1.25, eval_capacity_factor=2.0)
    assert moe.capacity(100, training=True) == math.ceil(100 * 2 / 8 * 1.25) == 32
    assert moe.capacity(100, training=False) == 50
    assert MoEConfig(num_experts=8).capacity(100, True) is None


def test_permute_and_unpermute_are_exact_inverses():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(6, 4, generator=g)
    routing_map = torch.rand(6, 3, generator=g) > 0.4
    token_index, expert_index = expert_order(routing_map, int(routing_map.sum()))
    assert expert_index.tolist() == sorted(expert_index.tolist())  # expert-major
    expected = [(t, e) for e in range(3) for t in range(6) if routing_map[t, e]]
    assert list(zip(token_index.tolist(), expert_index.tolist())) == expected
    rows = permute(tokens, token_index)
    weights = torch.ones(len(token_index))
    back = unpermute(rows, token_index, weights, 6)
    assert torch.equal(back, tokens * routing_map.sum(1, keepdim=True))


@pytest.mark.parametrize("backend", [b for b in available_backends(torch.device("cpu")) if b != "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_backends_equal_the_loop(backend, dtype):
    g = torch.Generator().manual_seed(2)
    counts = [3, 0, 5, 8]
    x = torch.randn(16, 32, generator=g).to(dtype).requires_grad_()
    w = torch.randn(4, 16, 32, generator=g).to(dtype).requires_grad_()
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    upstream = torch.randn(16, 16, generator=g).to(dtype)
    results = []
    for b in ("loop", backend):
        x.grad = w.grad = None
        y = grouped_linear(x, w, counts, offsets, b)
        (y * upstream).sum().backward()
        results.append((y.detach().float(), x.grad.float(), w.grad.float()))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(*results):
        assert ((a - b).norm() / b.norm()).item() < tol


def test_padded_layout_by_hand():
    counts, rows = padded_layout([3, 0, 33, 32], 32)
    assert counts == [32, 0, 64, 32]
    assert rows.tolist() == [0, 1, 2] + list(range(32, 65)) + list(range(96, 128))
    assert padded_layout([32, 0, 64], 32) == ([32, 0, 64], None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_pad_bf16_blocks_on_cpu_and_equal_a_direct_computation(dtype, monkeypatch):
    """bf16 on CPU: every expert GEMM sees a multiple of 32 rows; outputs and gradients are those of a float64
    SwiGLU per expert (the zero rows change nothing)."""
    config = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=16, num_attention_heads=4, vocab_size=64,
                         swiglu=True, add_bias_linear=False,
                         moe=MoEConfig(num_experts=4, router_topk=1, grouped_gemm=True))
    experts = GroupedExperts(config, AxisGroup("ep", (0,), 0), AxisGroup("etp", (0,), 0), dtype=dtype)
    g = torch.Generator().manual_seed(3)
    for p in experts.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)
    seen = []
    original = experts_module.grouped_linear

    def recording(x, weight, counts, offsets, backend):
        seen.append(list(counts))
        return original(x, weight, counts, offsets, backend)

    monkeypatch.setattr(experts_module, "grouped_linear", recording)
    counts = [3, 0, 37, 32]
    x = torch.randn(72, 32, generator=g).to(dtype).requires_grad_()
    upstream = torch.randn(72, 32, generator=g)
    y = experts(x, counts)
    (y.float() * upstream).sum().backward()
    assert seen == ([[32, 0, 64, 32]] * 2 if dtype == torch.bfloat16 else [counts] * 2)

    w1, w2 = (p.detach().double().requires_grad_() for p in (experts.linear_fc1.weight, experts.linear_fc2.weight))
    x64 = x.detach().double().requires_grad_()
    outs = []
    for e, block in enumerate(x64.split(counts)):
        gate, up = (block @ w1[e].t()).chunk(2, dim=-1)
        outs.append((torch.nn.functional.silu(gate) * up) @ w2[e].t())
    expected = torch.cat(outs)
    (expected * upstream.double()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in ((y, expected), (x.grad, x64.grad), (experts.linear_fc1.weight.grad, w1.grad),
                      (experts.linear_fc2.weight.grad, w2.grad)):
        assert ((got.double() - want).norm() / want.norm()).item() < tol


def test_metrics_by_direct_computation():
    scores = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    routed = torch.tensor([[True, True, False], [True, False, False]])
    kept = torch.tensor([[True, False, False], [True, False, False]])
    m = routing_metrics(scores, routed, kept)
    assert m["tokens_per_expert"].tolist() == [2, 1, 0]
    assert m["dropped_fraction"].item() == pytest.approx(1 / 3)
    assert m["entropy"].item() == pytest.approx(math.log(2) / 2)
    assert m["balance_top"].item() == pytest.approx(2 / 3) and m["balance_bottom"].item() == 0
    assert m["unused_experts"].item() == 1


@pytest.mark.parametrize("kwargs, needle", [
    (dict(num_experts=4, router_topk=5), "--moe-router-topk=5 must be between 1 and --num-experts=4"),
    (dict(num_experts=6, router_num_groups=4, router_group_topk=1), "--moe-router-num-groups=4 must divide"),
    (dict(num_experts=8, router_num_groups=4, router_group_topk=3, router_topk=2), "must be a multiple of"),
    (dict(num_experts=8, router_num_groups=4), "needs both"),
    (dict(num_experts=8, expert_capacity_factor=0.0), "--moe-expert-capacity-factor must be > 0"),
    (dict(num_experts=8, pad_expert_input_to_capacity=True), "--moe-pad-expert-input-to-capacity needs"),
    (dict(num_experts=8, router_pre_softmax=True, router_score_function="sigmoid"), "--moe-router-pre-softmax"),
    (dict(num_experts=8, token_dispatcher_type="flex"), "--moe-token-dispatcher-type"),
    (dict(num_experts=8, load_balancing_type=("aux_loss", "seq_aux_loss"), aux_loss_coeff=(0.1,)),
     "--moe-aux-loss-coeff gives 1 values for 2"),
])
def test_invalid_moe_configs(kwargs, needle):
    with pytest.raises(ValueError) as info:
        MoEConfig(**kwargs)
    assert needle in str(info.value)
