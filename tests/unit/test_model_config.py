"""ModelConfig: Megatron's defaults and padding rule, and errors naming the flags."""

import pytest

from megamoe.model.config import ModelConfig
from megamoe.moe.config import MoEConfig
from megamoe.parallel.config import ParallelConfig


def cfg(**kw):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=8, vocab_size=1000, seq_length=16)
    return ModelConfig(**{**base, **kw})


def test_megatron_defaults():
    c = cfg()
    assert (c.ffn_hidden_size, c.num_query_groups, c.kv_channels, c.max_position_embeddings) == (256, 8, 8, 16)
    assert cfg(swiglu=True, hidden_size=4096, num_attention_heads=32).ffn_hidden_size == 10880  # 8h/3 to 64
    assert c.padded_vocab_size(1) == 1024 and c.padded_vocab_size(4) == 1024 and c.padded_vocab_size(16) == 2048
    assert cfg(vocab_size=50257).padded_vocab_size(1) == 50304


@pytest.mark.parametrize("kwargs, needle", [
    (dict(hidden_size=60), "--hidden-size 60 is not divisible by --num-attention-heads 8; set --kv-channels"),
    (dict(num_query_groups=3), "--num-attention-heads 8 must be a multiple of --num-query-groups 3"),
    (dict(rotary_percent=1.5, position_embedding_type="rope"), "--rotary-percent must be in (0, 1]"),
    (dict(rotary_percent=0.0), "--rotary-percent must be in (0, 1]"),
    (dict(kv_channels=5, position_embedding_type="rope"), "rotary dimension kv_channels x rotary_percent = 5"),
    (dict(normalization="BatchNorm"), "--normalization must be one of"),
    (dict(position_embedding_type="alibi"), "--position-embedding-type must be one of"),
    (dict(max_position_embeddings=8), "--max-position-embeddings 8 is smaller than --seq-length 16"),
    (dict(hidden_dropout=1.0), "--hidden-dropout must be in [0, 1)"),
    (dict(num_layers=0), "--num-layers must be >= 1"),
    (dict(moe=MoEConfig(num_experts=4)), "MoE models need --disable-bias-linear"),
    (dict(attention_backend="triton"), "--attention-backend must be one of"),
])
def test_invalid_models(kwargs, needle):
    with pytest.raises(ValueError) as info:
        cfg(**kwargs)
    assert needle in str(info.value)


@pytest.mark.parametrize("model, parallel, needle", [
    (dict(num_attention_heads=6, hidden_size=48), dict(world_size=4, tp=4),
     "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    (dict(num_query_groups=2), dict(world_size=4, tp=4),
     "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"),
    (dict(ffn_hidden_size=100), dict(world_size=8, tp=8), "--ffn-hidden-size 100 is not divisible"),
    (dict(seq_length=18), dict(world_size=4, tp=4, sequence_parallel=True),
     "--seq-length 18 is not divisible by --tensor-model-parallel-size 4, which --sequence-parallel needs"),
    (dict(), dict(world_size=2, cp=2), "--context-parallel-size > 1 is not supported"),
    (dict(add_bias_linear=False, moe=MoEConfig(num_experts=6)), dict(world_size=4, ep=4),
     "--num-experts 6 is not divisible by --expert-model-parallel-size 4"),
    (dict(add_bias_linear=False, moe=MoEConfig(num_experts=4, ffn_hidden_size=30)), dict(world_size=4, ep=1, etp=4),
     "expert hidden size 30 (--moe-ffn-hidden-size) is not divisible by --expert-tensor-parallel-size 4"),
    (dict(add_bias_linear=False, moe=MoEConfig(num_experts=4)), dict(world_size=2, tp=2),
     "MoE layers with --tensor-model-parallel-size > 1 need --sequence-parallel"),
])
def test_layout_problems(model, parallel, needle):
    with pytest.raises(ValueError) as info:
        cfg(**model).check_layout(ParallelConfig(**parallel))
    assert needle in str(info.value)


def test_moe_layer_pattern():
    assert [cfg(num_layers=4, add_bias_linear=False, moe=MoEConfig(num_experts=4, layer_freq=2)).is_moe_layer(i) for i in range(4)] == \
        [True, False, True, False]
    assert [cfg(num_layers=4, add_bias_linear=False, moe=MoEConfig(num_experts=4, layer_freq=[0, 1, 1, 1])).is_moe_layer(i)
            for i in range(4)] == [False, True, True, True]
    with pytest.raises(ValueError, match="--moe-router-topk=3 must be between 1 and --num-experts=2"):
        MoEConfig(num_experts=2, router_topk=3)


def test_kernel_flags_reach_the_config():
    import argparse

    parser = argparse.ArgumentParser()
    ModelConfig.add_arguments(parser)
    base = "--num-layers 2 --hidden-size 64 --num-attention-heads 8 --seq-length 16".split()
    default = ModelConfig.from_args(parser.parse_args(base), 1000, None)
    assert (default.attention_backend, default.torch_compile) == ("auto", False)
    chosen = ModelConfig.from_args(parser.parse_args(base + ["--attention-backend", "unfused", "--torch-compile"]),
                                   1000, None)
    assert (chosen.attention_backend, chosen.torch_compile) == ("unfused", True)
