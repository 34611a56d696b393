"""Hugging Face Mixtral (and dense Mistral/Llama) <-> megamoe: configs and tensor names.

A megamoe tensor is made from one or more Hugging Face tensors and split back into them:
    model.embed_tokens.weight                           embedding.word_embeddings.weight
    model.layers.i.self_attn.{q,k,v}_proj.weight        decoder.layers.i.self_attention.linear_qkv.weight
        (rows per query group: its query heads, its key head, its value head, as Megatron-Core orders them)
    model.layers.i.self_attn.o_proj.weight              decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.input_layernorm.weight               decoder.layers.i.input_layernorm.weight
    model.layers.i.post_attention_layernorm.weight      decoder.layers.i.pre_mlp_layernorm.weight
    model.layers.i.block_sparse_moe.gate.weight         decoder.layers.i.mlp.router.weight
    ....block_sparse_moe.experts.e.{w1,w3}.weight       decoder.layers.i.mlp.experts.linear_fc1.weight [e] = [w1; w3]
    ....block_sparse_moe.experts.e.w2.weight            decoder.layers.i.mlp.experts.linear_fc2.weight [e]
    model.layers.i.mlp.{gate,up}_proj.weight (dense)    decoder.layers.i.mlp.linear_fc1.weight = [gate; up]
    model.layers.i.mlp.down_proj.weight (dense)         decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                                   decoder.final_layernorm.weight
    lm_head.weight (untied)                             output_layer.weight
Both use rotate-half RoPE and SwiGLU as silu(gate) * up, and Mixtral's router (softmax over the top-k logits)
is megamoe's default top-k router, so the tensors carry over unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from megamoe.model.config import ModelConfig
from megamoe.moe.config import MoEConfig

ARCHITECTURES = {"MixtralForCausalLM": "mixtral", "MistralForCausalLM": "mistral", "LlamaForCausalLM": "llama"}


@dataclass
class TensorMapping:
    """One megamoe tensor and the Hugging Face tensors it is made of."""

    key: str                                                 # megamoe name (without "model/")
    hf_keys: list[str]
    to_megamoe: Callable[[list[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]]


def _same(tensors):
    return tensors[0]


def _one(tensor):
    return [tensor]


def tensor_mappings(model: ModelConfig) -> list[TensorMapping]:
    """Every tensor of the model, in layer order."""
    c = model
    groups, per_group, d = c.num_query_groups, c.num_attention_heads // c.num_query_groups, c.kv_channels

    def qkv_to_megamoe(t):
        q, k, v = (x.reshape(groups, -1, d, x.shape[-1]) for x in t)          # [g, heads per group or 1, d, h]
        return torch.cat([q, k, v], dim=1).reshape(-1, t[0].shape[-1])

    def qkv_to_hf(t):
        grouped = t.reshape(groups, per_group + 2, d, t.shape[-1])
        return [grouped[:, :per_group].reshape(-1, t.shape[-1]), grouped[:, per_group].reshape(-1, t.shape[-1]),
                grouped[:, per_group + 1].reshape(-1, t.shape[-1])]

    def halves(t):
        return list(t.chunk(2, dim=0))

    out = [TensorMapping("embedding.word_embeddings.weight", ["model.embed_tokens.weight"], _same, _one)]
    for i in range(c.num_layers):
        hf, mm = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        out += [
            TensorMapping(mm + "input_layernorm.weight", [hf + "input_layernorm.weight"], _same, _one),
            TensorMapping(mm + "self_attention.linear_qkv.weight", [attn + "q_proj.weight", attn + "k_proj.weight",
                                                                     attn + "v_proj.weight"],
                          qkv_to_megamoe, qkv_to_hf),
            TensorMapping(mm + "self_attention.linear_proj.weight", [attn + "o_proj.weight"], _same, _one),
            TensorMapping(mm + "pre_mlp_layernorm.weight", [hf + "post_attention_layernorm.weight"], _same, _one),
        ]
        if c.is_moe_layer(i):
            moe = hf + "block_sparse_moe."
            experts = range(c.moe.num_experts)
            out += [
                TensorMapping(mm + "mlp.router.weight", [moe + "gate.weight"], _same, _one),
                TensorMapping(mm + "mlp.experts.linear_fc1.weight",
                              [f"{moe}experts.{e}.{w}.weight" for e in experts for w in ("w1", "w3")],
                              lambda t: torch.stack([torch.cat(t[2 * e:2 * e + 2]) for e in range(len(t) // 2)]),
                              lambda t: [h for expert in t for h in expert.chunk(2, dim=0)]),
                TensorMapping(mm + "mlp.experts.linear_fc2.weight", [f"{moe}experts.{e}.w2.weight" for e in experts],
                              torch.stack, lambda t: list(t.unbind(0))),
            ]
        else:
            mlp = hf + "mlp."
            out += [
                TensorMapping(mm + "mlp.linear_fc1.weight", [mlp + "gate_proj.weight", mlp + "up_proj.weight"],
                              torch.cat, halves),
                TensorMapping(mm + "mlp.linear_fc2.weight", [mlp + "down_proj.weight"], _same, _one),
            ]
    out.append(TensorMapping("decoder.final_layernorm.weight", ["model.norm.weight"], _same, _one))
    if c.untie_embeddings_and_output_weights:
        out.append(TensorMapping("output_layer.weight", ["lm_head.weight"], _same, _one))
    return out


# Configs ----------------------------------------------------------------------------------------------------------
def model_from_hf_config(hf: dict, seq_length: int | None = None) -> ModelConfig:
    """The megamoe model of a Hugging Face config.json (Mixtral, Mistral or Llama)."""
    arch = (hf.get("architectures") or ["?"])[0]
    problems = []
    if arch not in ARCHITECTURES:
        problems.append(f"architecture {arch} is not one of {sorted(ARCHITECTURES)}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        problems.append(f"RoPE scaling {rope.get('rope_type') or rope.get('type')!r} is not supported")
    if hf.get("sliding_window") not in (None, 0) and hf.get("use_sliding_window", True):
        problems.append(f"sliding-window attention ({hf['sliding_window']}) is not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention or MLP biases are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r}: only silu (SwiGLU) is supported")
    if problems:
        raise ValueError("cannot convert this Hugging Face model:\n  - " + "\n  - ".join(problems))
    moe = None
    if ARCHITECTURES[arch] == "mixtral":
        moe = MoEConfig(num_experts=hf["num_local_experts"], router_topk=hf["num_experts_per_tok"],
                        aux_loss_coeff=hf.get("router_aux_loss_coef", 0.0) or 0.0)
    max_positions = hf.get("max_position_embeddings", 4096)
    heads = hf["num_attention_heads"]
    return ModelConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_attention_heads=heads,
        vocab_size=hf["vocab_size"], seq_length=seq_length or min(max_positions, 4096),
        ffn_hidden_size=hf["intermediate_size"], num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads, max_position_embeddings=max_positions,
        normalization="RMSNorm", norm_epsilon=hf.get("rms_norm_eps", 1e-5), position_embedding_type="rope",
        rotary_base=int(rope.get("rope_theta", hf.get("rope_theta", 10000))), swiglu=True, add_bias_linear=False,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        init_method_std=hf.get("initializer_range", 0.02), hidden_dropout=0.0, attention_dropout=0.0, moe=moe)


def hf_config_from_model(model: ModelConfig, dtype: torch.dtype) -> dict:
    """A Hugging Face config.json for a megamoe model (Mixtral when it has MoE layers, else Mistral)."""
    c, m = model, model.moe
    problems = []
    if not (c.swiglu and c.normalization == "RMSNorm" and c.position_embedding_type == "rope"
            and not c.add_bias_linear and c.rotary_percent == 1.0):
        problems.append("the model must use --swiglu, --normalization RMSNorm, RoPE over whole heads and "
                        "--disable-bias-linear")
    if m is not None:
        if any(not c.is_moe_layer(i) for i in range(c.num_layers)):
            problems.append("Mixtral has an MoE MLP in every layer (--moe-layer-freq 1)")
        if m.shared_expert_intermediate_size or m.router_score_function != "softmax" or m.router_pre_softmax \
                or m.router_topk_scaling_factor or m.router_num_groups or m.router_enable_expert_bias \
                or m.router_type != "topk":
            problems.append("Mixtral's router is a plain softmax top-k without shared experts, pre-softmax, "
                            "scaling, groups or expert bias")
        if (m.ffn_hidden_size or c.ffn_hidden_size) != c.ffn_hidden_size:
            problems.append("--moe-ffn-hidden-size must equal --ffn-hidden-size for Mixtral's config")
    if problems:
        raise ValueError("this megamoe model has no Hugging Face Mixtral/Mistral equivalent:\n  - "
                         + "\n  - ".join(problems))
    out = {
        "architectures": ["MixtralForCausalLM" if m else "MistralForCausalLM"],
        "model_type": "mixtral" if m else "mistral",
        "hidden_size": c.hidden_size, "intermediate_size": c.ffn_hidden_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_query_groups,
        "head_dim": c.kv_channels, "vocab_size": c.vocab_size, "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.norm_epsilon, "rope_theta": float(c.rotary_base),
        "rope_parameters": {"rope_theta": float(c.rotary_base), "rope_type": "default"},
        "tie_word_embeddings": not c.untie_embeddings_and_output_weights, "hidden_act": "silu",
        "initializer_range": c.init_method_std, "attention_dropout": 0.0, "sliding_window": None,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True,
    }
    if m:
        out.update(num_local_experts=m.num_experts, num_experts_per_tok=m.router_topk,
                   router_aux_loss_coef=m.aux_loss_coeff if isinstance(m.aux_loss_coeff, float) else 0.0,
                   output_router_logits=False, router_jitter_noise=0.0)
    return out


def model_config_from_dict(d: dict) -> ModelConfig:
    """A ModelConfig from its dataclasses.asdict() form as stored in common.json (lists back to tuples)."""
    def tuples(cls, values):
        fields = {f.name for f in dataclasses.fields(cls)}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields}

    moe = d.get("moe")
    return ModelConfig(**{**tuples(ModelConfig, d), "moe": MoEConfig(**tuples(MoEConfig, moe)) if moe else None})


def model_flags(model: ModelConfig) -> list[str]:
    """The pretrain_gpt.py flags that build this model."""
    c = model
    flags = ["--num-layers", c.num_layers, "--hidden-size", c.hidden_size, "--ffn-hidden-size", c.ffn_hidden_size,
             "--num-attention-heads", c.num_attention_heads, "--group-query-attention", "--num-query-groups",
             c.num_query_groups, "--kv-channels", c.kv_channels, "--seq-length", c.seq_length,
             "--max-position-embeddings", c.max_position_embeddings, "--normalization", c.normalization,
             "--norm-epsilon", c.norm_epsilon, "--position-embedding-type", c.position_embedding_type,
             "--rotary-base", c.rotary_base, "--swiglu", "--disable-bias-linear", "--no-position-embedding"]
    if c.untie_embeddings_and_output_weights:
        flags.append("--untie-embeddings-and-output-weights")
    if c.moe:
        flags += ["--num-experts", c.moe.num_experts, "--moe-router-topk", c.moe.router_topk]
        if c.moe.ffn_hidden_size:
            flags += ["--moe-ffn-hidden-size", c.moe.ffn_hidden_size]
    return [str(f) for f in flags]
