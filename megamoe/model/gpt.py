"""A GPT model, tensor- and sequence-parallel, read top to bottom.

    input_ids [b, s] -> word embedding (+ learned positions) -> dropout          [s, b, h]  ([s/tp, b, h] under SP)
                     -> L x TransformerLayer:
                            x = x + dropout(attention(norm(x)))   GQA, RoPE, causal
                            x = x + dropout(mlp(norm(x)))         dense MLP (GELU or SwiGLU) or an MoE layer
                     -> final norm -> output layer (vocab split over tp)             [s, b, V/tp]
                     -> vocab-parallel cross entropy (when labels are given)       [b, s]

Parameter names follow Megatron-Core's local spec (embedding.word_embeddings.weight,
decoder.layers.{i}.self_attention.linear_qkv.weight, ...) and layer i is named by its *global* number on every
pipeline stage, so names, initial values (params.py) and dropout masks (random.py) are the same under every layout.
A pipeline stage is a GPTModel built with a contiguous range of layers; the first stage owns the embedding, the
last the output layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megamoe.model.block_attention import block_causal_attention
from megamoe.model.config import BLOCK_ATTENTION_MAX_SEQ, ModelConfig
from megamoe.model.fused import compiled, rms_norm_formula
from megamoe.model.mlp import MLP
from megamoe.model.rms_norm import rms_norm
from megamoe.moe.layer import MoELayer
from megamoe.parallel.group import AxisGroup
from megamoe.parallel.mesh import ParallelMesh
from megamoe.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megamoe.tensor_parallel.embedding import VocabParallelEmbedding
from megamoe.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megamoe.tensor_parallel.params import ParamSpec, initialize_parameters, new_param
from megamoe.tensor_parallel.random import DropoutContext, dropout

# Dropout sites inside a layer (the layer number is the other half of the site's name).
ATTENTION_PROBS, ATTENTION_OUT, MLP_OUT = 0, 1, 2
EMBEDDING_SITE = (-1, 0)


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dim. Under SP its weights see only a sequence shard on each tp rank, so
    they are marked sequence_parallel (their gradients are summed over tp)."""

    def __init__(self, config: ModelConfig, sequence_parallel: bool, device=None, dtype=None) -> None:
        super().__init__()
        h, self.kind, self.eps = config.hidden_size, config.normalization, config.norm_epsilon
        self.weight = new_param(ParamSpec((h,), init="ones", sequence_parallel=sequence_parallel), device, dtype)
        self.bias = (new_param(ParamSpec((h,), init="zeros", sequence_parallel=sequence_parallel), device, dtype)
                     if self.kind == "LayerNorm" else None)
        # RMSNorm: the compiled formula with --torch-compile, else the row-chunked op (F.rms_norm off CPU).
        self.rms_norm = compiled(rms_norm_formula, True) if config.torch_compile else rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "RMSNorm":
            return self.rms_norm(x, self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class PositionEmbedding(nn.Module):
    """Learned absolute positions. Replicated over tp; under SP each rank adds only its sequence shard's rows, so
    the weight's gradient is partial per rank (marked sequence_parallel)."""

    def __init__(self, config: ModelConfig, sequence_parallel: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = new_param(ParamSpec((config.max_position_embeddings, config.hidden_size),
                                          std=config.init_method_std, sequence_parallel=sequence_parallel),
                                device, dtype)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions, self.weight)


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [s, b, 1, rotary_dim] for positions [b, s] (Megatron's non-interleaved layout: the frequencies
    repeat across the two halves of the rotated dims)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=position_ids.device)
                               / rotary_dim))
    angles = position_ids.t().to(torch.float32).unsqueeze(-1) * inv_freq  # [s, b, rotary_dim / 2]
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim features of x [s, b, heads, d]; the rest pass through (rotary_percent < 1).
    Computed in x's dtype, as Megatron-Core's unfused path does (cos and sin are made in fp32, then cast)."""
    rot, rest = x[..., :cos.shape[-1]], x[..., cos.shape[-1]:]
    half = rot.shape[-1] // 2
    rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = torch.addcmul(rot * cos.to(x.dtype), rotated_half, sin.to(x.dtype))
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


class SelfAttention(nn.Module):
    """Causal self-attention with grouped query heads, split over tp by query group.

    linear_qkv's output rows are grouped as Megatron-Core groups them: for each query group, its query heads, then
    its key head, then its value head. A tp rank holds whole groups, so its query heads and their key/value heads
    are local and attention needs no communication.
    """

    def __init__(self, config: ModelConfig, tp_group: AxisGroup, sequence_parallel: bool, layer_number: int,
                 device=None, dtype=None) -> None:
        super().__init__()
        c, tp = config, tp_group.size
        self.layer_number, self.kv_channels, self.dropout_p = layer_number, c.kv_channels, c.attention_dropout
        self.recompute_core = c.recompute_granularity == "selective"
        self.backend = c.attention_backend
        self.apply_rotary = compiled(apply_rotary, c.torch_compile)
        self.groups_local = c.num_query_groups // tp
        self.queries_per_group = c.num_attention_heads // c.num_query_groups
        self.head_offset = tp_group.index * c.num_attention_heads // tp
        qkv_size = c.query_projection_size + 2 * c.kv_projection_size
        self.linear_qkv = ColumnParallelLinear(c.hidden_size, qkv_size, tp_group, sequence_parallel=sequence_parallel,
                                               bias=c.add_bias_linear, std=c.init_method_std, device=device, dtype=dtype)
        self.linear_proj = RowParallelLinear(c.query_projection_size, c.hidden_size, tp_group,
                                             sequence_parallel=sequence_parallel, bias=c.add_bias_linear,
                                             std=c.init_method_std / math.sqrt(2 * c.num_layers),
                                             device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                attention_mask: torch.Tensor | None, dropout_ctx: DropoutContext | None,
                kv_cache=None) -> torch.Tensor:
        qkv = self.linear_qkv(x)                                           # [s, b, groups/tp * (q/g + 2) * d]
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.groups_local, self.queries_per_group + 2, self.kv_channels)
        q = qkv[:, :, :, :self.queries_per_group].reshape(s, b, -1, self.kv_channels)  # [s, b, heads/tp, d]
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]                          # [s, b, groups/tp, d]
        if rotary is not None:
            q, k = self.apply_rotary(q, *rotary), self.apply_rotary(k, *rotary)
        blockwise = attention_mask is None and kv_cache is None and self._use_block_attention(q)
        core = self._block_attention if blockwise else self._core_attention
        if self.recompute_core and torch.is_grad_enabled():
            # Selective recomputation: the [b, heads, s, s] intermediates are rebuilt in backward, not stored.
            context = checkpoint(core, q, k, v, attention_mask, dropout_ctx, kv_cache, use_reentrant=False)
        else:
            context = core(q, k, v, attention_mask, dropout_ctx, kv_cache)  # [s, b, heads/tp * d]
        return self.linear_proj(context)

    def _use_block_attention(self, q: torch.Tensor) -> bool:
        """--attention-backend: unfused/local always, auto on CPU up to BLOCK_ATTENTION_MAX_SEQ positions (the kept
        probabilities grow with s^2); attention dropout needs the explicit path of _attention_with_dropout."""
        if self.training and self.dropout_p > 0:
            return False
        if self.backend in ("unfused", "local"):
            return True
        return self.backend == "auto" and q.device.type == "cpu" and q.shape[0] <= BLOCK_ATTENTION_MAX_SEQ

    def _block_attention(self, q, k, v, attention_mask, dropout_ctx, kv_cache):
        """Causal attention by block_causal_attention: [s, b, heads, d], [s, b, groups, d] -> [s, b, heads * d]."""
        s, b, _, d = q.shape
        g, r = self.groups_local, self.queries_per_group
        q = q.view(s, b, g, r, d).permute(1, 2, 0, 3, 4).reshape(b, g, s * r, d)  # rows ordered (position, head)
        context = block_causal_attention(q, k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3))
        return context.view(b, g, s, r, d).permute(2, 0, 1, 3, 4).reshape(s, b, g * r * d)

    def _core_attention(self, q, k, v, attention_mask, dropout_ctx, kv_cache):
        """softmax(q k^T / sqrt(d)) v, causal or masked, by SDPA: [s, b, heads, d], [s, b, groups, d] ->
        [s, b, heads * d]; with kv_cache, this step's keys and values join the cached ones first."""
        s, b = q.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))              # [b, heads, s, d]
        if kv_cache is not None:  # generation: this step's keys and values join the cached ones
            k, v = kv_cache.update(self.layer_number, k, v)                # [b, groups/tp, cache length, d]
        if self.training and self.dropout_p > 0:
            context = self._attention_with_dropout(q, k, v, attention_mask, dropout_ctx)
        else:
            mask = None if attention_mask is None else ~attention_mask   # Megatron's mask: True = masked
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=attention_mask is None,
                                                     enable_gqa=True)
        return context.permute(2, 0, 1, 3).reshape(s, b, -1)             # [s, b, heads/tp * d]

    def _attention_with_dropout(self, q, k, v, attention_mask, ctx):
        # The explicit path, so the probabilities' dropout mask is the layout-invariant one of random.py.
        k = k.repeat_interleave(self.queries_per_group, dim=1)
        v = v.repeat_interleave(self.queries_per_group, dim=1)
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.kv_channels)  # [b, heads, s, s]
        s = scores.shape[-1]
        if attention_mask is None:
            attention_mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        probs = scores.masked_fill(attention_mask, float("-inf")).softmax(dim=-1).to(q.dtype)
        arange = torch.arange(s, device=q.device)
        heads = self.head_offset + torch.arange(q.shape[1], device=q.device)
        probs = dropout(probs, self.dropout_p, True, ctx, (self.layer_number, ATTENTION_PROBS),
                        (ctx.sample_ids, heads, arange, arange))
        return probs @ v


# build_mlp(config, mesh, layer_number, device, dtype) -> module mapping ([s, b, h], DropoutContext) to [s, b, h]
MLPBuilder = Callable[[ModelConfig, ParallelMesh, int, torch.device | None, torch.dtype | None], nn.Module]


def build_mlp(config: ModelConfig, mesh: ParallelMesh, layer_number: int, device=None, dtype=None) -> nn.Module:
    """The default MLP slot: an MoE layer where config.moe says so (--num-experts, --moe-layer-freq), else dense."""
    if config.is_moe_layer(layer_number):
        return MoELayer(config, mesh, layer_number, device, dtype)
    return MLP(config, mesh["tp"], mesh.config.sequence_parallel, config.ffn_hidden_size, device, dtype)


class TransformerLayer(nn.Module):
    """Pre-norm attention and MLP, each with dropout before its residual add."""

    def __init__(self, config: ModelConfig, mesh: ParallelMesh, layer_number: int, build_mlp: MLPBuilder,
                 device=None, dtype=None) -> None:
        super().__init__()
        sp = mesh.config.sequence_parallel
        self.layer_number, self.hidden_dropout = layer_number, config.hidden_dropout
        self.input_layernorm = Norm(config, sp, device, dtype)
        self.self_attention = SelfAttention(config, mesh["tp"], sp, layer_number, device, dtype)
        self.pre_mlp_layernorm = Norm(config, sp, device, dtype)
        self.mlp = build_mlp(config, mesh, layer_number, device, dtype)

    def forward(self, x, rotary, attention_mask, dropout_ctx, hidden_coords, kv_cache=None):
        out = self.self_attention(self.input_layernorm(x), rotary, attention_mask, dropout_ctx, kv_cache)
        x = x + dropout(out, self.hidden_dropout, self.training, dropout_ctx, (self.layer_number, ATTENTION_OUT),
                        hidden_coords)
        out = self.mlp(self.pre_mlp_layernorm(x), dropout_ctx)
        return x + dropout(out, self.hidden_dropout, self.training, dropout_ctx, (self.layer_number, MLP_OUT),
                           hidden_coords)


class TransformerBlock(nn.Module):
    """The layers of one pipeline stage, keyed by global layer number, and the final norm on the last stage."""

    def __init__(self, config: ModelConfig, mesh: ParallelMesh, layer_numbers: range, final_norm: bool,
                 build_mlp: MLPBuilder, device=None, dtype=None) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): TransformerLayer(config, mesh, i, build_mlp, device, dtype)
                                     for i in layer_numbers})
        self.final_layernorm = Norm(config, mesh.config.sequence_parallel, device, dtype) if final_norm else None


def recompute_plan(config: ModelConfig, num_layers: int) -> list[tuple[range, bool]]:
    """This chunk's layers (local indices) in consecutive groups, each with whether it is recomputed (Megatron's
    --recompute-granularity full): uniform checkpoints every group of recompute_num_layers layers, block
    checkpoints the first recompute_num_layers layers one by one and runs the rest normally."""
    n = config.recompute_num_layers
    if config.recompute_granularity != "full":
        return [(range(num_layers), False)]
    if config.recompute_method == "uniform":
        return [(range(i, min(i + n, num_layers)), True) for i in range(0, num_layers, n)]
    blocked = min(n, num_layers)
    return [(range(i, i + 1), True) for i in range(blocked)] + [(range(blocked, num_layers), False)]


def _run_layers(layers, x, rotary, attention_mask, dropout_ctx, hidden_coords, kv_cache=None):
    for layer in layers:
        x = layer(x, rotary, attention_mask, dropout_ctx, hidden_coords, kv_cache)
    return x


class GPTModel(nn.Module):
    """A GPT model, or one pipeline stage of it.

    Args:
        config: the model.
        mesh: the parallel layout (uses mesh["tp"] and sequence parallelism).
        seed: initialization seed; parameters depend only on (seed, global name, global slice).
        layer_numbers: the global layers this stage holds (default: all).
        pre_process: holds the embedding (default: layer 0 is here).
        post_process: holds the final norm and output layer (default: the last layer is here).
        build_mlp: what fills each layer's MLP slot (default: dense MLP or MoE layer per config.moe).
    """

    def __init__(self, config: ModelConfig, mesh: ParallelMesh, *, seed: int = 1234,
                 layer_numbers: range | None = None, pre_process: bool | None = None,
                 post_process: bool | None = None, build_mlp: MLPBuilder = build_mlp,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        config.check_layout(mesh.config)
        layer_numbers = range(config.num_layers) if layer_numbers is None else layer_numbers
        self.config, self.mesh, self.seed = config, mesh, seed
        self.pre_process = 0 in layer_numbers if pre_process is None else pre_process
        self.post_process = config.num_layers - 1 in layer_numbers if post_process is None else post_process
        self.tp_group, self.sequence_parallel = mesh["tp"], mesh.config.sequence_parallel
        device = device if device is not None else mesh.device
        vocab, h, sp = config.padded_vocab_size(mesh.config.tp), config.hidden_size, self.sequence_parallel
        tied = not config.untie_embeddings_and_output_weights

        if self.pre_process:
            self.embedding = nn.Module()
            self.embedding.word_embeddings = VocabParallelEmbedding(vocab, h, self.tp_group, sequence_parallel=sp,
                                                                    std=config.init_method_std, device=device,
                                                                    dtype=dtype)
            if config.position_embedding_type == "learned_absolute":
                self.embedding.position_embeddings = PositionEmbedding(config, sp, device, dtype)
        self.decoder = TransformerBlock(config, mesh, layer_numbers, self.post_process, build_mlp, device, dtype)
        if self.post_process:
            # Tied on one stage: the forward passes the word embedding as the weight.
            self.output_layer = ColumnParallelLinear(h, vocab, self.tp_group, sequence_parallel=sp, bias=False,
                                                     std=config.init_method_std, skip_weight=tied and self.pre_process,
                                                     device=device, dtype=dtype)
            if tied and not self.pre_process:
                # A separate copy on the last pipeline stage, starting from the word embedding's values; the
                # embedding group keeps the two in sync by summing their gradients.
                weight = self.output_layer.weight
                weight.spec = dataclasses.replace(weight.spec, init_key="embedding.word_embeddings.weight")
        # Vocabulary rows past the real vocabulary are padding (Megatron pads to 128 x tp): they start at zero, and
        # the loss ignores their logits, so every tp trains the same model.
        for table in (self.embedding.word_embeddings.weight if self.pre_process else None,
                      self.output_layer.weight if self.post_process else None):
            if table is not None:
                table.spec = dataclasses.replace(table.spec, valid_rows=config.vocab_size)
        initialize_parameters(self, seed)

    def forward(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None, sample_ids: torch.Tensor | None = None,
                kv_cache=None) -> torch.Tensor:
        """One micro-batch through this stage.

        Args:
            input_ids: [b, s] token ids (first stage).
            position_ids: [b, s]; default 0..s-1 for every sample.
            attention_mask: [b or 1, 1, s, s] bool, True where attention is not allowed; default causal. With
                kv_cache: [b or 1, 1, s, cache length], over the cached positions.
            labels: [b, s] target ids (last stage); when given, returns the per-token loss [b, s].
            hidden_states: [s(/tp), b, h] from the previous stage (other stages).
            sample_ids: [b] global sample ids naming the dropout masks; default 0..b-1.
            kv_cache: for generation (megamoe.inference.generation.KVCache): keys and values of the positions
                already seen; this call's are written at position_ids.
        Returns:
            loss [b, s] (labels given), logits [b, s, V/tp] (last stage), or hidden states [s(/tp), b, h].
        """
        c = self.config
        if self.pre_process:
            b, s = input_ids.shape
        else:
            s, b = hidden_states.shape[0] * (self.tp_group.size if self.sequence_parallel else 1), hidden_states.shape[1]
        device = input_ids.device if input_ids is not None else hidden_states.device
        if position_ids is None:
            position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
        dropout_ctx = DropoutContext(self.seed, sample_ids if sample_ids is not None
                                     else torch.arange(b, device=device))
        # Global coordinates (position, sample, feature) of this rank's hidden-state elements, for dropout masks.
        s_local = s // self.tp_group.size if self.sequence_parallel else s
        s_offset = dropout_ctx.seq_offset + (self.tp_group.index * s_local if self.sequence_parallel else 0)
        hidden_coords = (s_offset + torch.arange(s_local, device=device), dropout_ctx.sample_ids,
                         torch.arange(c.hidden_size, device=device))

        if self.pre_process:
            x = self.embedding.word_embeddings(input_ids)                  # [s(/tp), b, h]
            if c.position_embedding_type == "learned_absolute":
                positions = position_ids.t()[s_offset - dropout_ctx.seq_offset:][:s_local]
                x = x + self.embedding.position_embeddings(positions)
            x = dropout(x, c.hidden_dropout, self.training, dropout_ctx, EMBEDDING_SITE, hidden_coords)
        else:
            x = hidden_states
        rotary = (rotary_cos_sin(position_ids, c.rotary_dim, c.rotary_base)
                  if c.position_embedding_type == "rope" else None)
        layers = list(self.decoder.layers.values())
        for group, recompute in recompute_plan(c, len(layers)):
            run = functools.partial(_run_layers, layers[group.start:group.stop])
            if recompute and torch.is_grad_enabled():
                # Only the group's input is kept; backward runs the group's forward again.
                x = checkpoint(run, x, rotary, attention_mask, dropout_ctx, hidden_coords, use_reentrant=False)
            else:
                x = run(x, rotary, attention_mask, dropout_ctx, hidden_coords, kv_cache)
        if not self.post_process:
            return x
        x = self.decoder.final_layernorm(x)
        weight = self.embedding.word_embeddings.weight if self.output_layer.weight is None else None
        logits = self.output_layer(x, weight=weight)                      # [s, b, V/tp]
        if labels is None:
            return logits.transpose(0, 1)
        # The logits are this function's own: the loss may overwrite them with their gradient.
        return vocab_parallel_cross_entropy(logits, labels.t(), self.tp_group, c.vocab_size, in_place=True).t()
