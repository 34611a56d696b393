"""rms_norm against RMSNorm written out in float64."""

import pytest
import torch

from megamoe.model.fused import rms_norm_formula
from megamoe.model.rms_norm import chunk_rows, rms_norm
from tests.model_cases import rel


def reference(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("op", [rms_norm, rms_norm_formula])  # the CPU op, and the formula --torch-compile fuses
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 6e-3)])
def test_values_and_gradients_equal_float64_formula(op, dtype, tol):
    torch.manual_seed(0)
    rows = chunk_rows(48) + 37  # [rows, 3, 48]: three full chunks of rows and a partial one
    x = torch.randn(rows, 3, 48, dtype=torch.float64) * 4
    w, grad = torch.rand(48, dtype=torch.float64) + 0.5, torch.randn(rows, 3, 48, dtype=torch.float64)
    ref_x, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    expected = reference(ref_x, ref_w, 1e-5)
    expected.backward(grad)

    got_x, got_w = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    kept_x, kept_grad = got_x.detach().clone(), grad.to(dtype)
    out = op(got_x, got_w, 1e-5)
    out.backward(kept_grad.clone())
    assert out.dtype == got_x.grad.dtype == got_w.grad.dtype == dtype
    assert rel(out, expected) < tol
    assert rel(got_x.grad, ref_x.grad) < tol
    assert rel(got_w.grad, ref_w.grad) < tol
    assert torch.equal(got_x.detach(), kept_x)  # the input is not normalized in place


def test_eps_matters_for_small_rows():
    x = torch.full((1, 4), 1e-3, dtype=torch.float64)
    out = rms_norm(x, torch.ones(4, dtype=torch.float64), 1e-6)
    assert out[0, 0].item() == pytest.approx(1e-3 / (1e-6 + 1e-6) ** 0.5, rel=1e-12)
