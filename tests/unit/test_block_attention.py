"""block_causal_attention against causal attention written out in float64, and the model's backends against
each other."""

import math

import pytest
import torch

from megamoe.model.block_attention import block_causal_attention
from tests.model_cases import rel, run_model


def reference(q, k, v):
    """Causal GQA attention in float64, head by head: q [b, heads, s, d], k and v [b, groups, s, d]."""
    heads, groups, s, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    k, v = (t.double().repeat_interleave(heads // groups, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def rows_by_position(x, groups):
    """[b, heads, s, d] -> [b, groups, s * heads/groups, d], rows ordered (position, head), as the op wants."""
    b, heads, s, d = x.shape
    return x.view(b, groups, heads // groups, s, d).transpose(2, 3).reshape(b, groups, s * heads // groups, d)


def heads_first(x, heads):
    b, groups, rows, d = x.shape
    return x.view(b, groups, rows * groups // heads, heads // groups, d).transpose(2, 3).reshape(b, heads, -1, d)


@pytest.mark.parametrize("heads,groups,s,block", [(4, 4, 37, 8), (8, 2, 64, 16), (6, 1, 20, 64), (4, 2, 33, 1)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_values_and_gradients_equal_float64_attention(heads, groups, s, block, dtype, tol):
    torch.manual_seed(0)
    b, d = 2, 16
    q, k, v = (torch.randn(b, n, s, d, dtype=torch.float64) for n in (heads, groups, groups))
    grad = torch.randn(b, heads, s, d, dtype=torch.float64)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = reference(*ref_inputs)
    expected.backward(grad)

    inputs = [rows_by_position(q, groups).to(dtype).requires_grad_()] + [t.to(dtype).requires_grad_() for t in (k, v)]
    out = block_causal_attention(*inputs, block=block)
    out.backward(rows_by_position(grad, groups).to(dtype))
    assert out.dtype == dtype
    assert rel(heads_first(out, heads), expected) < tol
    assert rel(heads_first(inputs[0].grad, heads), ref_inputs[0].grad) < tol
    for got, want in zip(inputs[1:], ref_inputs[1:]):
        assert got.grad.dtype == dtype and rel(got.grad, want.grad) < tol


def test_first_position_sees_only_itself():
    # Position 0 attends to key 0 alone, whatever the scores: its output is v[0] exactly.
    q, k, v = torch.randn(1, 1, 12, 4), torch.randn(1, 1, 12, 4) * 50, torch.randn(1, 1, 12, 4)
    out = block_causal_attention(q, k, v, block=5)
    assert torch.equal(out[0, 0, 0], v[0, 0, 0])


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\[b, g, s\*r, d\]"):
        block_causal_attention(torch.randn(1, 2, 10, 4), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4))


@pytest.mark.parametrize("backend", ["unfused", "auto"])
def test_model_backends_agree_with_sdpa(backend):
    # The whole model (GQA, RoPE; 80 positions = two blocks of 64) in training mode: block-causal attention and
    # SDPA give the same loss and gradients in fp32.
    kwargs = dict(num_query_groups=2, position_embedding_type="rope", seq_length=80)
    flash = run_model(dict(kwargs, attention_backend="flash"), training=True)
    other = run_model(dict(kwargs, attention_backend=backend), training=True)
    assert rel(other["loss"], flash["loss"]) < 1e-6
    for name, g in flash["grads"].items():
        assert rel(other["grads"][name], g) < 1e-5, name
