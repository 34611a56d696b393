"""Parameter counts and Megatron's training FLOPs, against published figures and hand computation."""

import pytest

from megamoe.model.accounting import (local_parameter_count, parameter_counts, training_flops_per_sample,
                                      training_flops_per_token)
from megamoe.model.config import ModelConfig
from megamoe.moe.config import MoEConfig

MIXTRAL_8X7B = ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                           num_query_groups=8, vocab_size=32000, seq_length=4096, max_position_embeddings=32768,
                           normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                           add_bias_linear=False, untie_embeddings_and_output_weights=True,
                           moe=MoEConfig(num_experts=8, router_topk=2))


def test_mixtral_flops_per_sample_equals_megatron():
    assert training_flops_per_sample(MIXTRAL_8X7B) == pytest.approx(3.2648e14, rel=2e-5)


def test_mixtral_parameter_counts_equal_published():
    counts = parameter_counts(MIXTRAL_8X7B)
    assert counts.total == 46_702_792_704          # Mixtral-8x7B's published parameter count
    assert counts.active_per_token == 12_879_925_248  # "12.9B active"
    assert counts.expert == 32 * 8 * 3 * 4096 * 14336
    assert counts.embedding == counts.output_layer == 32000 * 4096


def test_gpt2_small_flops_by_hand():
    cfg = ModelConfig(num_layers=12, hidden_size=768, num_attention_heads=12, vocab_size=50257, seq_length=1024)
    assert cfg.padded_vocab_size(1) == 50304
    mlp = 6 * 768 * 3072 * 2 * 12            # 6 H ffn f per layer, f = 2 without SwiGLU
    attention = 6 * (768 * 3 * 768 + 768 * 768) * 12
    logits = 6 * 768 * 50304
    core = 12 * 6 * 768 * 1024 ** 2           # 6 q s^2 per layer
    assert mlp + attention + logits == 741_408_768
    assert training_flops_per_sample(cfg) == 741_408_768 * 1024 + core == 817_184_636_928
    assert training_flops_per_token(cfg) == pytest.approx(817_184_636_928 / 1024)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(swiglu=True, add_bias_linear=False, normalization="RMSNorm", position_embedding_type="rope"),
    dict(num_query_groups=2, untie_embeddings_and_output_weights=True),
])
def test_closed_form_equals_the_built_model(kwargs):
    from megamoe.model.gpt import GPTModel
    from megamoe.parallel.config import ParallelConfig
    from megamoe.parallel.mesh import ParallelMesh

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=300, seq_length=16, **kwargs)
    model = GPTModel(cfg, ParallelMesh(ParallelConfig(world_size=1)))
    assert local_parameter_count(model) == parameter_counts(cfg).total
