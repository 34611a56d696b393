"""ModelConfig: the shape of a GPT model, with Megatron-LM's names, defaults and validation."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from megamoe.moe.config import MoEConfig
from megamoe.parallel.config import ParallelConfig

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("learned_absolute", "rope", "none")
# Megatron-LM's --attention-backend values. flash and fused: torch's scaled_dot_product_attention (its flash or
# memory-efficient kernels); unfused and local: megamoe's block-causal attention (model/block_attention.py), which
# keeps the probabilities for backward; auto: block-causal on CPU up to BLOCK_ATTENTION_MAX_SEQ keys, else SDPA.
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")
BLOCK_ATTENTION_MAX_SEQ = 2048


@dataclass(frozen=True)
class ModelConfig:
    """A GPT model. Each field is the Megatron-LM flag of the same name (dashes for underscores).

    Derived defaults (as Megatron-LM): ffn_hidden_size 4h (SwiGLU: 8h/3 rounded down to a multiple of 64),
    num_query_groups = num_attention_heads (no GQA), kv_channels = hidden / heads, max_position_embeddings =
    seq_length. `moe` makes some MLPs Mixture-of-Experts layers.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    seq_length: int = 1024
    ffn_hidden_size: int | None = None
    num_query_groups: int | None = None
    kv_channels: int | None = None
    max_position_embeddings: int | None = None
    make_vocab_size_divisible_by: int = 128
    normalization: str = "LayerNorm"
    norm_epsilon: float = 1e-5
    position_embedding_type: str = "learned_absolute"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    swiglu: bool = False
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    attention_backend: str = "auto"
    # torch.compile the elementwise chains (SwiGLU, RMSNorm, RoPE; model/fused.py); a run-time choice like the
    # attention backend: same formulas, fused.
    torch_compile: bool = False
    moe: MoEConfig | None = None
    # Activation recomputation (Megatron's --recompute-*): trades a second forward in backward for memory. It
    # changes no value: dropout masks are hashed from element identities and routing statistics are counted once.
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None

    def __post_init__(self) -> None:
        h, heads = self.hidden_size, self.num_attention_heads
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", int(8 * h / 3 / 64) * 64 if self.swiglu else 4 * h)
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", heads)
        if self.kv_channels is None and heads > 0 and h % heads == 0:
            object.__setattr__(self, "kv_channels", h // heads)
        if self.max_position_embeddings is None:
            object.__setattr__(self, "max_position_embeddings", self.seq_length)
        problems = self.problems()
        if problems:
            raise ValueError("invalid model config:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        """Every reason the model itself is impossible, each naming the flags."""
        out = []
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length",
                     "ffn_hidden_size", "num_query_groups", "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if out:
            return out
        if self.kv_channels is None:
            out.append(f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                       f"{self.num_attention_heads}; set --kv-channels explicitly or change one of them")
        elif self.kv_channels < 1:
            out.append(f"--kv-channels must be >= 1, got {self.kv_channels}")
        if self.num_attention_heads % self.num_query_groups:
            out.append(f"--num-attention-heads {self.num_attention_heads} must be a multiple of --num-query-groups "
                       f"{self.num_query_groups} (each query group shares one key/value head)")
        if self.normalization not in NORMALIZATIONS:
            out.append(f"--normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            out.append(f"--position-embedding-type must be one of {POSITION_EMBEDDINGS}, "
                       f"got {self.position_embedding_type!r}")
        if not 0.0 < self.rotary_percent <= 1.0:
            out.append(f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
        elif self.position_embedding_type == "rope" and self.kv_channels and self.rotary_dim % 2:
            out.append(f"rotary dimension kv_channels x rotary_percent = {self.rotary_dim} must be even; "
                       f"change --kv-channels or --rotary-percent")
        if self.max_position_embeddings < self.seq_length and self.position_embedding_type == "learned_absolute":
            out.append(f"--max-position-embeddings {self.max_position_embeddings} is smaller than --seq-length "
                       f"{self.seq_length}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                out.append(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            out.append(f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.init_method_std <= 0:
            out.append(f"--init-method-std must be > 0, got {self.init_method_std}")
        if self.moe is not None and self.add_bias_linear:
            out.append("experts have no biases: MoE models need --disable-bias-linear")
        return out + self._recompute_problems()

    def _recompute_problems(self) -> list[str]:
        granularity, method, layers = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if granularity not in (None, "full", "selective"):
            return [f"--recompute-granularity must be full or selective, got {granularity!r}"]
        if method not in (None, "uniform", "block"):
            return [f"--recompute-method must be uniform or block, got {method!r}"]
        if granularity == "full" and (method is None or layers is None or layers < 1):
            return ["--recompute-granularity full needs --recompute-method uniform|block and "
                    "--recompute-num-layers >= 1"]
        if granularity != "full" and method is not None:
            return ["--recompute-method applies to --recompute-granularity full only (selective recomputes the "
                    "core attention of every layer)"]
        return []

    def layout_problems(self, parallel: ParallelConfig) -> list[str]:
        """Reasons this model cannot run under `parallel`, each naming the flags; checked before any collective."""
        tp, out = parallel.tp, []
        for name, value in (("num_attention_heads", self.num_attention_heads),
                            ("num_query_groups", self.num_query_groups), ("ffn_hidden_size", self.ffn_hidden_size)):
            if value % tp:
                out.append(f"--{name.replace('_', '-')} {value} is not divisible by --tensor-model-parallel-size {tp}")
        if parallel.sequence_parallel and self.seq_length % tp:
            out.append(f"--seq-length {self.seq_length} is not divisible by --tensor-model-parallel-size {tp}, "
                       f"which --sequence-parallel needs")
        if parallel.cp > 1:
            out.append("--context-parallel-size > 1 is not supported by the model yet; use 1")
        if self.moe is not None:
            moe, etp = self.moe, parallel.etp
            if moe.num_experts % parallel.ep:
                out.append(f"--num-experts {moe.num_experts} is not divisible by --expert-model-parallel-size "
                           f"{parallel.ep}")
            expert_ffn = moe.ffn_hidden_size or self.ffn_hidden_size
            if expert_ffn % etp:
                out.append(f"expert hidden size {expert_ffn} (--moe-ffn-hidden-size) is not divisible by "
                           f"--expert-tensor-parallel-size {etp}")
            if tp > 1 and not parallel.sequence_parallel:
                out.append("MoE layers with --tensor-model-parallel-size > 1 need --sequence-parallel (each tp "
                           "rank must hold different tokens), as in Megatron-LM")
            shared = moe.shared_expert_intermediate_size
            if shared and shared % tp:
                out.append(f"--moe-shared-expert-intermediate-size {shared} is not divisible by "
                           f"--tensor-model-parallel-size {tp}")
        return out

    def check_layout(self, parallel: ParallelConfig) -> None:
        """Raise ValueError listing every layout problem (see layout_problems)."""
        problems = self.layout_problems(parallel)
        if problems:
            raise ValueError("model does not fit the parallel layout:\n  - " + "\n  - ".join(problems))

    # Flags ------------------------------------------------------------------------------------------------------
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Megatron-LM's model flags (and the Mixtral script's no-op ones: --use-mcore-models,
        --no-masked-softmax-fusion)."""
        g = parser.add_argument_group("model", "Megatron-LM's model flags")
        for flag, kind, default in (("--num-layers", int, None), ("--hidden-size", int, None),
                                    ("--num-attention-heads", int, None), ("--seq-length", int, None),
                                    ("--ffn-hidden-size", int, None), ("--num-query-groups", int, None),
                                    ("--kv-channels", int, None), ("--max-position-embeddings", int, None),
                                    ("--make-vocab-size-divisible-by", int, 128), ("--norm-epsilon", float, 1e-5),
                                    ("--rotary-base", int, 10000), ("--rotary-percent", float, 1.0),
                                    ("--init-method-std", float, 0.02), ("--hidden-dropout", float, 0.1),
                                    ("--attention-dropout", float, 0.1)):
            g.add_argument(flag, type=kind, default=default)
        g.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
        g.add_argument("--position-embedding-type", default="learned_absolute",
                       choices=["learned_absolute", "rope", "none"])
        g.add_argument("--no-position-embedding", action="store_true",
                       help="no learned absolute positions (with rope: rope only)")
        g.add_argument("--swiglu", action="store_true")
        g.add_argument("--disable-bias-linear", action="store_true")
        g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
        g.add_argument("--group-query-attention", action="store_true", help="use --num-query-groups")
        g.add_argument("--use-mcore-models", action="store_true", help="accepted; megamoe has one model")
        g.add_argument("--no-masked-softmax-fusion", action="store_true",
                       help="accepted; the softmax's fusion follows --attention-backend")
        g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                       help="flash/fused: torch's scaled_dot_product_attention; unfused/local: block-causal "
                            "attention that skips the masked triangle and keeps the probabilities for backward; "
                            f"auto: block-causal on CPU for sequences up to {BLOCK_ATTENTION_MAX_SEQ}, else SDPA")
        g.add_argument("--torch-compile", action="store_true",
                       help="fuse the elementwise chains (SwiGLU, RMSNorm, RoPE) with torch.compile; compiling takes "
                            "seconds to a minute at start-up")
        g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                       help="full: recompute whole layers (with --recompute-method/--recompute-num-layers); "
                            "selective: recompute the core attention only")
        g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                       help="uniform: checkpoint groups of --recompute-num-layers layers; block: recompute the "
                            "first --recompute-num-layers layers of each pipeline chunk")
        g.add_argument("--recompute-num-layers", type=int, default=None)

    @classmethod
    def from_args(cls, args: argparse.Namespace, vocab_size: int, moe: MoEConfig | None) -> "ModelConfig":
        missing = [f for f in ("num_layers", "hidden_size", "num_attention_heads", "seq_length")
                   if getattr(args, f) is None]
        if missing:
            raise ValueError("missing model flags: " + ", ".join("--" + m.replace("_", "-") for m in missing))
        position = args.position_embedding_type
        if args.no_position_embedding and position == "learned_absolute":
            position = "none"
        return cls(num_layers=args.num_layers, hidden_size=args.hidden_size,
                   num_attention_heads=args.num_attention_heads, vocab_size=vocab_size, seq_length=args.seq_length,
                   ffn_hidden_size=args.ffn_hidden_size,
                   num_query_groups=args.num_query_groups if args.group_query_attention else None,
                   kv_channels=args.kv_channels, max_position_embeddings=args.max_position_embeddings,
                   make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, normalization=args.normalization,
                   norm_epsilon=args.norm_epsilon, position_embedding_type=position, rotary_base=args.rotary_base,
                   rotary_percent=args.rotary_percent, swiglu=args.swiglu, add_bias_linear=not args.disable_bias_linear,
                   untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
                   init_method_std=args.init_method_std, hidden_dropout=args.hidden_dropout,
                   attention_dropout=args.attention_dropout, attention_backend=args.attention_backend,
                   torch_compile=args.torch_compile, moe=moe,
                   recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
                   recompute_num_layers=args.recompute_num_layers)

    # Derived sizes --------------------------------------------------------------------------------------------
    def padded_vocab_size(self, tp: int) -> int:
        """Megatron's rule: the vocabulary rounded up to a multiple of make_vocab_size_divisible_by x tp."""
        multiple = self.make_vocab_size_divisible_by * tp
        return math.ceil(self.vocab_size / multiple) * multiple

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_percent)

    @property
    def query_projection_size(self) -> int:
        return self.kv_channels * self.num_attention_heads

    @property
    def kv_projection_size(self) -> int:
        return self.kv_channels * self.num_query_groups

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(layer, self.num_layers)
