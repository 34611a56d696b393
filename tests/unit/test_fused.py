"""--torch-compile: the compiled elementwise chains train the same model as the eager ones."""

import pytest
import torch

from megamoe.model.fused import mlp_activation, rms_norm_formula, swiglu
from megamoe.model.swiglu import swiglu_op
from megamoe.moe.config import MoEConfig
from tests.model_cases import rel, run_model


def test_eager_formulas_by_hand():
    h = torch.tensor([[0.0, 1.0, 2.0, -3.0]])                # gate [0, 1], up [2, -3]
    assert torch.allclose(swiglu(h), torch.tensor([[0.0, -3.0 / (1.0 + torch.e ** -1.0)]]))
    x = torch.tensor([[3.0, 4.0]])                           # mean of squares 12.5
    out = rms_norm_formula(x, torch.tensor([1.0, 2.0]), 0.0)
    assert torch.allclose(out, torch.tensor([[3.0, 8.0]]) / 12.5 ** 0.5)


def test_compiled_model_equals_eager():
    # Dense SwiGLU MLP and an MoE layer (grouped experts), RMSNorm, RoPE, GQA; 80 positions; fp32 training mode.
    base = dict(num_query_groups=2, position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                add_bias_linear=False, seq_length=80, num_layers=2)
    moe = MoEConfig(num_experts=4, router_topk=2, grouped_gemm=True, layer_freq=(0, 1))
    for kwargs in (base, dict(base, moe=moe)):
        eager = run_model(kwargs, training=True)
        fused = run_model(dict(kwargs, torch_compile=True), training=True)
        assert rel(fused["loss"], eager["loss"]) < 1e-6
        for name, g in eager["grads"].items():
            assert rel(fused["grads"][name], g) < 2e-6, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_op_is_the_formula_bitwise(dtype):
    # The eager op writes its two gradient halves in place of autograd's cat; every bit must stay the formula's.
    torch.manual_seed(0)
    for rows in ((37, 3), (0,)):                              # a 3-D input, and an expert with no rows
        h = torch.randn(*rows, 2 * 24, dtype=dtype) * 3
        grad = torch.randn(*rows, 24, dtype=dtype)
        by_formula, by_op = h.clone().requires_grad_(), h.clone().requires_grad_()
        expected, got = swiglu(by_formula), swiglu_op(by_op)
        expected.backward(grad)
        got.backward(grad)
        assert torch.equal(got, expected) and torch.equal(by_op.grad, by_formula.grad)
    assert mlp_activation(True, False) is swiglu_op


def test_swiglu_op_gradient_equals_finite_differences():
    # An independent reference for the hand-placed gradient halves: float64 central differences.
    h = (torch.randn(5, 2, 2 * 6, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(swiglu_op, (h,))
