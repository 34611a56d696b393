"""The tp=1 GPTModel against an independent reference written here with plain tensor maths.

The reference reads the model's parameters by name and recomputes logits and loss with explicit per-head loops,
the rotation formula written out, hand-written norms and a causal mask built element by element. Only the
documented weight layouts are shared: linear_qkv rows grouped per query group as (its query heads, key, value),
SwiGLU's fc1 as [gate; up].
"""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.model_cases import SEED, VARIANTS, batch, make_config, run_model


def norm(x, weight, bias, kind, eps):
    if kind == "RMSNorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def rotate(v, pos, rotary_dim, base):
    """Rotate pairs (i, i + r/2) of v's first r features by pos * base^(-2i/r)."""
    out = v.clone()
    half = rotary_dim // 2
    for i in range(half):
        theta = pos * base ** (-2 * i / rotary_dim)
        a, b = v[i], v[i + half]
        out[i] = a * math.cos(theta) - b * math.sin(theta)
        out[i + half] = b * math.cos(theta) + a * math.sin(theta)
    return out


def reference(cfg, P, ids, labels):
    b, s = ids.shape
    d, nq, ng = cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    qpg = nq // ng
    x = P["embedding.word_embeddings.weight"][ids]                       # [b, s, h]
    if cfg.position_embedding_type == "learned_absolute":
        x = x + P["embedding.position_embeddings.weight"][:s]
    for layer in range(cfg.num_layers):
        p = lambda name: P.get(f"decoder.layers.{layer}.{name}")  # noqa: E731
        y = norm(x, p("input_layernorm.weight"), p("input_layernorm.bias"), cfg.normalization, cfg.norm_epsilon)
        W, bias = p("self_attention.linear_qkv.weight"), p("self_attention.linear_qkv.bias")
        qkv = y @ W.t() + (bias if bias is not None else 0)
        heads = []
        for head in range(nq):
            group, j = divmod(head, qpg)
            base_row = group * (qpg + 2) * d
            q = qkv[..., base_row + j * d: base_row + (j + 1) * d]
            k = qkv[..., base_row + qpg * d: base_row + (qpg + 1) * d]
            v = qkv[..., base_row + (qpg + 1) * d: base_row + (qpg + 2) * d]
            out = torch.zeros(b, s, d)
            for bi in range(b):
                qs, ks = q[bi], k[bi]
                if cfg.position_embedding_type == "rope":
                    qs = torch.stack([rotate(qs[t], t, cfg.rotary_dim, cfg.rotary_base) for t in range(s)])
                    ks = torch.stack([rotate(ks[t], t, cfg.rotary_dim, cfg.rotary_base) for t in range(s)])
                scores = qs @ ks.t() / math.sqrt(d)
                for t in range(s):
                    for u in range(t + 1, s):
                        scores[t, u] = float("-inf")
                out[bi] = torch.softmax(scores, dim=-1) @ v[bi]
            heads.append(out)
        context = torch.cat(heads, dim=-1)
        attn = context @ p("self_attention.linear_proj.weight").t()
        if p("self_attention.linear_proj.bias") is not None:
            attn = attn + p("self_attention.linear_proj.bias")
        x = x + attn
        y = norm(x, p("pre_mlp_layernorm.weight"), p("pre_mlp_layernorm.bias"), cfg.normalization, cfg.norm_epsilon)
        W1, b1 = p("mlp.linear_fc1.weight"), p("mlp.linear_fc1.bias")
        z = y @ W1.t() + (b1 if b1 is not None else 0)
        if cfg.swiglu:
            f = cfg.ffn_hidden_size
            z = z[..., :f] * torch.sigmoid(z[..., :f]) * z[..., f:]
        else:
            z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
        mlp = z @ p("mlp.linear_fc2.weight").t()
        if p("mlp.linear_fc2.bias") is not None:
            mlp = mlp + p("mlp.linear_fc2.bias")
        x = x + mlp
    x = norm(x, P["decoder.final_layernorm.weight"], P.get("decoder.final_layernorm.bias"), cfg.normalization,
             cfg.norm_epsilon)
    out_w = P.get("output_layer.weight", P["embedding.word_embeddings.weight"])
    logits = x @ out_w.t()
    real = logits[..., :cfg.vocab_size]  # padded vocabulary entries are not tokens
    loss = F.cross_entropy(real.reshape(-1, cfg.vocab_size), labels.reshape(-1), reduction="none").view(b, s)
    return logits, loss


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tp1_model_equals_reference(variant):
    cfg = make_config(**VARIANTS[variant])
    got = run_model(VARIANTS[variant])
    params = {n: t.clone().requires_grad_() for n, t in got["params"].items()}
    ids, labels = batch(cfg)
    logits, loss = reference(cfg, params, ids, labels)
    loss.mean().backward()
    assert rel(got["logits"], logits.detach()) < 1e-5
    assert rel(got["loss"], loss.detach()) < 1e-5
    for name, param in params.items():
        assert rel(got["grads"][name], param.grad) < 1e-5, name
    # padded vocabulary rows start at zero and get no gradient
    table = got["params"]["embedding.word_embeddings.weight"]
    assert table.shape[0] == cfg.padded_vocab_size(1) == 384
    assert torch.all(table[cfg.vocab_size:] == 0)
    assert torch.all(got["grads"]["embedding.word_embeddings.weight"][cfg.vocab_size:] == 0)


def test_training_mode_with_dropout_is_deterministic_and_differs_from_eval():
    kwargs = dict(VARIANTS["mixtral"], hidden_dropout=0.2, attention_dropout=0.2)
    a, b = run_model(kwargs, training=True), run_model(kwargs, training=True)
    assert torch.equal(a["loss"], b["loss"])
    assert not torch.allclose(a["loss"], run_model(kwargs, training=False)["loss"])


def test_seed_changes_every_parameter():
    from megamoe.tensor_parallel.params import ParamSpec, global_init_tensor

    spec = ParamSpec((4, 4))
    assert not torch.equal(global_init_tensor(spec, SEED, "w"), global_init_tensor(spec, SEED + 1, "w"))
    assert not torch.equal(global_init_tensor(spec, SEED, "w"), global_init_tensor(spec, SEED, "v"))
    assert torch.equal(global_init_tensor(spec, SEED, "w"), global_init_tensor(spec, SEED, "w"))
