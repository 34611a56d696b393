"""Tensor and sequence parallelism reproduce the single-process model: initial values bitwise, logits, loss and
every gradient to 1e-5, dropout masks included; and vocab-parallel cross entropy equals torch's."""

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megamoe.parallel.group import AxisGroup
from megamoe.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from tests.model_cases import VARIANTS, check_against_single_process, make_config, rel, run_model


def _tp_body(variant_kwargs, sequence_parallel, training=False):
    return run_model(variant_kwargs, sequence_parallel=sequence_parallel, training=training)


def _valid(variant_kwargs, tp):
    cfg = make_config(**variant_kwargs)
    return cfg.num_query_groups % tp == 0


DEFAULT_CASES = [(name, tp, sp) for name, tp, sp in itertools.product(("mixtral", "gpt", "gqa2", "nopos"), (2, 4),
                                                                      (False, True))
                 if _valid(VARIANTS[name], tp)]


@pytest.mark.parametrize("variant, tp, sp", DEFAULT_CASES)
def test_tensor_parallel_equals_single_process(dist_run, variant, tp, sp):
    check_against_single_process(VARIANTS[variant], dist_run(tp, _tp_body, VARIANTS[variant], sp))


def test_tensor_parallel_long_sequence_compiled(dist_run):
    # 80 positions: two blocks of the block-causal attention, each tp rank with its own query groups; and the
    # --torch-compile kernels (SwiGLU, RMSNorm, RoPE) on sequence shards. Against one process, in training mode.
    kwargs = dict(VARIANTS["mixtral"], seq_length=80, torch_compile=True)
    check_against_single_process(kwargs, dist_run(2, _tp_body, kwargs, True, True), training=True)


FULL_AXES = dict(num_query_groups=(1, 2, 8), untie_embeddings_and_output_weights=(False, True),
                 position_embedding_type=("rope", "learned_absolute"), normalization=("RMSNorm", "LayerNorm"),
                 swiglu=(False, True))
FULL_CASES = [(dict(zip(FULL_AXES, values)), tp, sp)
              for values in itertools.product(*FULL_AXES.values()) for tp in (2, 4) for sp in (False, True)]


@pytest.mark.full
@pytest.mark.parametrize("kwargs, tp, sp", [c for c in FULL_CASES if _valid(c[0], c[1])])
def test_tensor_parallel_matrix(dist_run, kwargs, tp, sp):
    check_against_single_process(kwargs, dist_run(tp, _tp_body, kwargs, sp))


def test_dropout_masks_are_layout_invariant(dist_run):
    # With dropout on in training, tp=2 + SP draws exactly the single-process masks: attention probabilities
    # (sharded by head), hidden states (sharded by sequence) and the embedding output all match, so the loss and
    # every gradient equal the tp=1 run. Any mask drawn per rank would change them far beyond round-off.
    kwargs = dict(VARIANTS["mixtral"], hidden_dropout=0.3, attention_dropout=0.3)
    per_rank = dist_run(2, _tp_body, kwargs, True, True)
    check_against_single_process(kwargs, per_rank, training=True)
    assert not torch.allclose(per_rank[0]["loss"], run_model(kwargs, training=False)["loss"])


CE_SHAPE = (23, 3)  # 69 rows: three chunks of the loss's row-chunked passes, the last one partial


def _ce_inputs(vocab, padded, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*CE_SHAPE, padded, generator=g) * 3).to(dtype)
    return logits, torch.randint(0, vocab, CE_SHAPE, generator=g), torch.rand(*CE_SHAPE, generator=g)


def _cross_entropy_body(vocab, padded, seed, dtype, in_place):
    group = AxisGroup.world()
    logits, target, upstream = _ce_inputs(vocab, padded, seed, dtype)
    per = padded // group.size
    local = logits[..., group.index * per:(group.index + 1) * per].clone().requires_grad_()
    # In place, the loss overwrites its input: give it a copy (an intermediate, as the model's logits are).
    loss = vocab_parallel_cross_entropy(local * 1 if in_place else local, target, group, vocab_size=vocab,
                                        in_place=in_place)
    (loss * upstream).sum().backward()
    return loss.detach(), local.grad


@pytest.mark.parametrize("tp,dtype,in_place", [(1, torch.float32, False), (2, torch.float32, False),
                                               (4, torch.float32, True), (1, torch.bfloat16, True),
                                               (2, torch.bfloat16, False), (2, torch.bfloat16, True)])
def test_vocab_parallel_cross_entropy_equals_torch(dist_run, tp, dtype, in_place):
    vocab, padded, seed = 11, 12, 3  # 11 real ids, padded to 12 so that tp = 4 splits evenly
    logits, target, upstream = _ce_inputs(vocab, padded, seed, dtype)
    logits = logits.double().requires_grad_()  # the reference: the same logit values, in float64
    expected = F.cross_entropy(logits[..., :vocab].reshape(-1, vocab), target.reshape(-1), reduction="none")
    (expected.view(CE_SHAPE) * upstream).sum().backward()
    results = dist_run(tp, _cross_entropy_body, vocab, padded, seed, dtype, in_place)
    for loss, _ in results:
        assert loss.dtype == torch.float32 and rel(loss, expected.detach().view(CE_SHAPE)) < 1e-6
    grad = torch.cat([g for _, g in results], dim=-1)
    assert grad.dtype == dtype
    assert rel(grad, logits.grad) < (1e-6 if dtype == torch.float32 else 4e-3)  # bf16: one rounding
    assert torch.all(grad[..., vocab:] == 0)


@pytest.mark.parametrize("upstream", ["1/69", "1/64", "bf16 values", "per-token rand"])
def test_bf16_cross_entropy_gradient_is_rounded_as_defined(upstream):
    # bf16 logits: the gradient is (softmax - onehot) rounded to bf16, times the incoming gradient in fp32, rounded
    # again. Whether that factor is exact in bf16 (1/64, bf16 values: a same-dtype multiply) or not (1/69, rand):
    # bitwise the same as that formula computed here with plain torch ops.
    vocab = padded = 12
    logits, target, rand = _ce_inputs(vocab, padded, 5, torch.bfloat16)
    factor = {"1/69": torch.full(CE_SHAPE, 1 / 69), "1/64": torch.full(CE_SHAPE, 1 / 64),
              "bf16 values": rand.bfloat16().float(), "per-token rand": rand}[upstream]
    probs = torch.softmax(logits.float(), dim=-1) - F.one_hot(target, padded).float()
    expected = (probs.bfloat16().float() * factor.unsqueeze(-1)).bfloat16()
    local = logits.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local * 1, target, AxisGroup("tp", (0,), 0), vocab, in_place=True)
    (loss * factor).sum().backward()
    assert local.grad.dtype == torch.bfloat16 and torch.equal(local.grad, expected)


def _bad_layout_body():
    from megamoe.model.gpt import GPTModel
    from megamoe.parallel.config import ParallelConfig
    from megamoe.parallel.mesh import ParallelMesh

    mesh = ParallelMesh(ParallelConfig(world_size=dist.get_world_size(), tp=dist.get_world_size()))
    try:
        GPTModel(make_config(num_attention_heads=6, num_query_groups=3, hidden_size=36), mesh)
    except ValueError as err:
        return str(err)
    return None


def test_model_that_does_not_fit_tp_fails_on_every_rank(dist_run):
    for message in dist_run(2, _bad_layout_body):
        assert "--num-query-groups 3 is not divisible by --tensor-model-parallel-size 2" in message
