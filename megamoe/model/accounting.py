"""Parameter counts and training FLOPs of a ModelConfig, in closed form.

FLOPs follow Megatron-LM's formula (the one behind its "throughput per GPU (TFLOP/s/GPU)" log), derived here:

  * A token passing through a weight matrix of a x b elements costs 2ab FLOPs forward (a multiply and an add per
    element) and 4ab backward (gradient of the input and of the weight): 6ab in training. So every matmul weight a
    token touches costs 6 x (its element count) per token:
        attention projections   6 H (q + k + v) + 6 q H         q = heads x kv_channels, k = v = groups x kv_channels
        dense MLP               6 H ffn f                       f = 3 with SwiGLU (gate, up, down), else 2
        MoE MLP                 6 H moe_ffn f k + 6 H shared_ffn f        (k experts per token, plus shared experts)
        output layer            6 H V                            V the padded vocabulary
  * Attention itself: per token, QK^T and AV are 2 s q FLOPs each forward, x3 for training, halved by the causal
    mask: 6 s q per token, so 6 q s^2 per sample and layer.
  Routers, norms and element-wise work are left out, as Megatron-LM leaves them out.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from megamoe.model.config import ModelConfig


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of the whole model (what one process holds with no parallelism)."""

    total: int
    embedding: int         # word embeddings, plus learned position embeddings
    output_layer: int      # an untied output layer (0 when tied)
    expert: int            # routed experts' weights, all layers
    active_per_token: int  # what one token uses: everything but the experts it is not routed to

    @property
    def non_expert(self) -> int:
        return self.total - self.expert


def _mlp_params(c: ModelConfig, ffn: int) -> int:
    gated = 2 if c.swiglu else 1
    weights = c.hidden_size * ffn * gated + ffn * c.hidden_size
    biases = (ffn * gated + c.hidden_size) if c.add_bias_linear else 0
    return weights + biases


def parameter_counts(c: ModelConfig, tp: int = 1) -> ParameterCounts:
    """Closed-form counts; `tp` matters only through the padded vocabulary (Megatron pads to 128 x tp)."""
    h, vocab = c.hidden_size, c.padded_vocab_size(tp)
    norm = h * (2 if c.normalization == "LayerNorm" else 1)
    qkv = c.query_projection_size + 2 * c.kv_projection_size
    attention = h * qkv + c.query_projection_size * h + ((qkv + h) if c.add_bias_linear else 0)
    total = expert = inactive = 0
    for layer in range(c.num_layers):
        total += 2 * norm + attention
        if c.is_moe_layer(layer):
            moe = c.moe
            one_expert = _mlp_params(c, moe.ffn_hidden_size or c.ffn_hidden_size)
            shared = (_mlp_params(c, moe.shared_expert_intermediate_size)
                      if moe.shared_expert_intermediate_size else 0)
            total += h * moe.num_experts + moe.num_experts * one_expert + shared  # router, experts, shared
            expert += moe.num_experts * one_expert
            inactive += (moe.num_experts - moe.router_topk) * one_expert
        else:
            total += _mlp_params(c, c.ffn_hidden_size)
    embedding = vocab * h + (c.max_position_embeddings * h if c.position_embedding_type == "learned_absolute" else 0)
    output = vocab * h if c.untie_embeddings_and_output_weights else 0
    total += norm + embedding + output
    return ParameterCounts(total, embedding, output, expert, total - inactive)


def local_parameter_count(module: nn.Module) -> int:
    """Elements of the parameters this rank holds (shards count their local size; tied weights once)."""
    return sum(p.numel() for p in module.parameters())


def training_flops_per_sample(c: ModelConfig, seq_length: int | None = None, tp: int = 1) -> int:
    """Forward + backward FLOPs of one sample of `seq_length` tokens (default c.seq_length); see the module doc."""
    s = seq_length or c.seq_length
    h, f = c.hidden_size, 3 if c.swiglu else 2
    q, kv = c.query_projection_size, c.kv_projection_size
    per_token = 0
    for layer in range(c.num_layers):
        per_token += 6 * (h * (q + 2 * kv) + q * h)
        if c.is_moe_layer(layer):
            moe = c.moe
            per_token += 6 * h * (moe.ffn_hidden_size or c.ffn_hidden_size) * f * moe.router_topk
            per_token += 6 * h * (moe.shared_expert_intermediate_size or 0) * f
        else:
            per_token += 6 * h * c.ffn_hidden_size * f
    per_token += 6 * h * c.padded_vocab_size(tp)
    attention_core = c.num_layers * 6 * q * s * s
    return per_token * s + attention_core


def training_flops_per_token(c: ModelConfig, seq_length: int | None = None, tp: int = 1) -> float:
    s = seq_length or c.seq_length
    return training_flops_per_sample(c, s, tp) / s
