"""MoEConfig: Mixture-of-Experts options, named after Megatron-LM's --moe-* flags, validated where defined."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

SCORE_FUNCTIONS = ("softmax", "sigmoid")
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
ROUTER_TYPES = ("topk", "expert_choice")
SECOND_EXPERT_POLICIES = ("all", "sampling", "random")
DROP_POLICIES = ("probs", "position")
DISPATCHERS = ("allgather", "alltoall")
ROUTER_DTYPES = (None, "fp32", "fp64")


@dataclass(frozen=True)
class MoEConfig:
    """Attributes (Megatron-LM flag in brackets):
        num_experts: experts per MoE layer [--num-experts].
        router_topk: experts each token is sent to [--moe-router-topk].
        ffn_hidden_size: hidden size of one expert; None: the model's ffn_hidden_size [--moe-ffn-hidden-size].
        shared_expert_intermediate_size: total hidden size of the shared experts; None: none
            [--moe-shared-expert-intermediate-size]; shared_expert_gate: scale them by a learned sigmoid gate.
        layer_freq: an int k means layers 0, k, 2k, ... are MoE; a 0/1 list gives the pattern [--moe-layer-freq].
        router_score_function: softmax or sigmoid [--moe-router-score-function].
        router_pre_softmax: softmax over all experts before top-k (else top-k logits, then softmax over them)
            [--moe-router-pre-softmax].
        router_topk_scaling_factor: multiply the routing weights [--moe-router-topk-scaling-factor].
        router_num_groups, router_group_topk: group-limited routing: experts form num_groups groups, a token may
            use experts of its group_topk best groups only [--moe-router-num-groups, --moe-router-group-topk].
        router_dtype: fp32 or fp64 routing maths; None: the activations' dtype [--moe-router-dtype].
        router_type: "topk" (each token picks experts) or "expert_choice" (each expert picks its `capacity`
            best tokens; non-causal: a token's routing depends on later tokens of the micro-batch) [--moe-router-type].
        second_expert_policy: fairseq's top-2 policy: "all" uses both experts; "sampling" draws the second expert
            by Gumbel-max over the others; "random" keeps the second with probability min(1, 2 p2)
            [--moe-second-expert-policy].
        input_jitter_eps: multiply router inputs by uniform(1 - eps, 1 + eps) in training [--moe-input-jitter-eps].
        router_enable_expert_bias: aux-loss-free balancing: a per-expert bias added to the scores for selection
            only, moved by router_bias_update_rate towards balance once per optimizer step
            [--moe-router-enable-expert-bias, --moe-router-bias-update-rate].
        load_balancing_type: aux losses, combinable (a tuple), or "sinkhorn" (S-BASE) [--moe-router-load-balancing-type].
            "global_aux_loss" (Megatron-LM's) takes each expert's load over all micro-batches of the step so far,
            summed over data-parallel replicas: it is the same under every tp, sp, ep, etp and dispatcher, but
            depends on how the global batch is split between dp and gradient accumulation (layout-dependent).
        aux_loss_coeff: one coefficient, or one per load_balancing_type entry [--moe-aux-loss-coeff].
        z_loss_coeff: router z-loss coefficient [--moe-z-loss-coeff].
        expert_capacity_factor: capacity = ceil(tokens * topk / experts * factor) per routing group; None is
            dropless [--moe-expert-capacity-factor].
        token_drop_policy: past capacity, drop the lowest-probability ("probs") or latest ("position") tokens
            [--moe-token-drop-policy].
        pad_expert_input_to_capacity: every expert processes exactly `capacity` slots [--moe-pad-expert-input-to-capacity].
        eval_capacity_factor: capacity factor in evaluation; None: the training one [--moe-eval-capacity-factor].
        eval_capacity_token_fraction: fairseq's evaluation capacity, ceil(fraction x tokens) per expert; wins over
            eval_capacity_factor [--moe-eval-capacity-token-fraction].
        token_dispatcher_type: allgather or alltoall [--moe-token-dispatcher-type].
        grouped_gemm: use a grouped GEMM for the experts (else a loop over experts) [--moe-grouped-gemm].
    """

    num_experts: int
    router_topk: int = 2
    ffn_hidden_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    layer_freq: int | tuple[int, ...] = 1
    router_score_function: str = "softmax"
    router_pre_softmax: bool = False
    router_topk_scaling_factor: float | None = None
    router_num_groups: int | None = None
    router_group_topk: int | None = None
    router_dtype: str | None = None
    router_type: str = "topk"
    second_expert_policy: str = "all"
    input_jitter_eps: float | None = None
    router_enable_expert_bias: bool = False
    router_bias_update_rate: float = 1e-3
    load_balancing_type: tuple[str, ...] = ("aux_loss",)
    aux_loss_coeff: float | tuple[float, ...] = 0.0
    z_loss_coeff: float | None = None
    expert_capacity_factor: float | None = None
    token_drop_policy: str = "probs"
    pad_expert_input_to_capacity: bool = False
    eval_capacity_factor: float | None = None
    eval_capacity_token_fraction: float | None = None
    token_dispatcher_type: str = "allgather"
    grouped_gemm: bool = False

    def __post_init__(self) -> None:
        for name in ("layer_freq", "load_balancing_type", "aux_loss_coeff"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.load_balancing_type, str):
            object.__setattr__(self, "load_balancing_type", (self.load_balancing_type,))
        problems = self.problems()
        if problems:
            raise ValueError("invalid MoE config:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        out = []
        e, k = self.num_experts, self.router_topk
        if e < 1:
            return [f"--num-experts must be >= 1, got {e}"]
        if not 1 <= k <= e:
            out.append(f"--moe-router-topk={k} must be between 1 and --num-experts={e}")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size < 1:
            out.append(f"--moe-ffn-hidden-size must be >= 1, got {self.ffn_hidden_size}")
        if isinstance(self.layer_freq, int) and self.layer_freq < 1:
            out.append(f"--moe-layer-freq must be >= 1 or a 0/1 list, got {self.layer_freq}")
        if isinstance(self.layer_freq, tuple) and not set(self.layer_freq) <= {0, 1}:
            out.append(f"--moe-layer-freq list must hold only 0 and 1, got {list(self.layer_freq)}")
        if self.router_score_function not in SCORE_FUNCTIONS:
            out.append(f"--moe-router-score-function must be one of {SCORE_FUNCTIONS}")
        if self.router_pre_softmax and self.router_score_function != "softmax":
            out.append("--moe-router-pre-softmax needs --moe-router-score-function softmax")
        if (self.router_num_groups is None) != (self.router_group_topk is None):
            out.append("group-limited routing needs both --moe-router-num-groups and --moe-router-group-topk")
        elif self.router_num_groups is not None:
            g, gk = self.router_num_groups, self.router_group_topk
            if g < 1 or e % g:
                out.append(f"--moe-router-num-groups={g} must divide --num-experts={e}")
            elif not 1 <= gk <= g:
                out.append(f"--moe-router-group-topk={gk} must be between 1 and --moe-router-num-groups={g}")
            elif k % gk or k // gk > e // g:
                out.append(f"--moe-router-topk={k} must be a multiple of --moe-router-group-topk={gk} and pick at "
                           f"most {e // g} experts per group")
        if self.router_dtype not in ROUTER_DTYPES:
            out.append(f"--moe-router-dtype must be fp32 or fp64, got {self.router_dtype!r}")
        unknown = [t for t in self.load_balancing_type if t not in LOAD_BALANCING]
        if unknown:
            out.append(f"--moe-router-load-balancing-type {unknown} not supported; use {LOAD_BALANCING}")
        if isinstance(self.aux_loss_coeff, tuple) and len(self.aux_loss_coeff) != len(self.load_balancing_type):
            out.append(f"--moe-aux-loss-coeff gives {len(self.aux_loss_coeff)} values for "
                       f"{len(self.load_balancing_type)} load-balancing types")
        for name in ("expert_capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                flag = "--moe-expert-capacity-factor" if name == "expert_capacity_factor" else "--moe-eval-capacity-factor"
                out.append(f"{flag} must be > 0, got {value}")
        if self.pad_expert_input_to_capacity and self.expert_capacity_factor is None:
            out.append("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
        if self.token_drop_policy not in DROP_POLICIES:
            out.append(f"--moe-token-drop-policy must be one of {DROP_POLICIES}")
        if self.token_dispatcher_type not in DISPATCHERS:
            out.append(f"--moe-token-dispatcher-type must be one of {DISPATCHERS}")
        if self.router_type not in ROUTER_TYPES:
            out.append(f"--moe-router-type must be one of {ROUTER_TYPES}")
        if self.second_expert_policy not in SECOND_EXPERT_POLICIES:
            out.append(f"--moe-second-expert-policy must be one of {SECOND_EXPERT_POLICIES}")
        elif self.second_expert_policy != "all" and (k != 2 or self.router_score_function != "softmax"
                                                     or self.router_pre_softmax):
            out.append("--moe-second-expert-policy sampling|random is fairseq's top-2 gating: it needs "
                       "--moe-router-topk 2 with --moe-router-score-function softmax and no --moe-router-pre-softmax")
        if self.input_jitter_eps is not None and not 0 < self.input_jitter_eps < 1:
            out.append(f"--moe-input-jitter-eps must be in (0, 1), got {self.input_jitter_eps}")
        if self.router_enable_expert_bias and self.router_score_function != "sigmoid":
            out.append("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid (the bias shifts "
                       "sigmoid affinities; softmax scores are relative and would change meaning)")
        if self.router_bias_update_rate <= 0:
            out.append(f"--moe-router-bias-update-rate must be > 0, got {self.router_bias_update_rate}")
        if "sinkhorn" in self.load_balancing_type and len(self.load_balancing_type) > 1:
            out.append("--moe-router-load-balancing-type sinkhorn balances by itself: do not combine it with others")
        if self.eval_capacity_token_fraction is not None and not 0 < self.eval_capacity_token_fraction <= 1:
            out.append(f"--moe-eval-capacity-token-fraction must be in (0, 1], "
                       f"got {self.eval_capacity_token_fraction}")
        if self.router_type == "expert_choice":
            clash = [flag for flag, on in (("--moe-router-load-balancing-type sinkhorn", "sinkhorn" in self.load_balancing_type),
                                           ("--moe-router-num-groups", self.router_num_groups is not None),
                                           ("--moe-second-expert-policy", self.second_expert_policy != "all"),
                                           ("--moe-router-enable-expert-bias", self.router_enable_expert_bias),
                                           ("--moe-pad-expert-input-to-capacity", self.pad_expert_input_to_capacity))
                     if on]
            if clash:
                out.append(f"--moe-router-type expert_choice cannot be combined with {', '.join(clash)}")
        return out

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Megatron-LM's --num-experts and --moe-* flags."""
        g = parser.add_argument_group("moe", "Mixture of Experts (Megatron-LM's flags)")
        g.add_argument("--num-experts", type=int, default=None)
        g.add_argument("--moe-router-topk", type=int, default=2)
        g.add_argument("--moe-ffn-hidden-size", type=int, default=None)
        g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
        g.add_argument("--moe-shared-expert-gate", action="store_true")
        g.add_argument("--moe-layer-freq", default="1", help="k (every k-th layer) or a list like [0,1,1,1]")
        g.add_argument("--moe-router-score-function", default="softmax", choices=SCORE_FUNCTIONS)
        g.add_argument("--moe-router-pre-softmax", action="store_true")
        g.add_argument("--moe-router-topk-scaling-factor", type=float, default=None)
        g.add_argument("--moe-router-num-groups", type=int, default=None)
        g.add_argument("--moe-router-group-topk", type=int, default=None)
        g.add_argument("--moe-router-dtype", default=None, choices=["fp32", "fp64"])
        g.add_argument("--moe-router-type", default="topk", choices=ROUTER_TYPES)
        g.add_argument("--moe-second-expert-policy", default="all", choices=SECOND_EXPERT_POLICIES)
        g.add_argument("--moe-input-jitter-eps", type=float, default=None)
        g.add_argument("--moe-router-enable-expert-bias", action="store_true")
        g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
        g.add_argument("--moe-router-load-balancing-type", nargs="+", default=["aux_loss"])
        g.add_argument("--moe-aux-loss-coeff", type=float, nargs="+", default=[0.0])
        g.add_argument("--moe-z-loss-coeff", type=float, default=None)
        g.add_argument("--moe-expert-capacity-factor", type=float, default=None)
        g.add_argument("--moe-token-drop-policy", default="probs", choices=DROP_POLICIES)
        g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true")
        g.add_argument("--moe-eval-capacity-factor", type=float, default=None)
        g.add_argument("--moe-eval-capacity-token-fraction", type=float, default=None)
        g.add_argument("--moe-token-dispatcher-type", default="allgather", choices=DISPATCHERS)
        g.add_argument("--moe-grouped-gemm", action="store_true")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "MoEConfig | None":
        if not args.num_experts:
            return None
        freq = args.moe_layer_freq.strip()
        layer_freq = tuple(int(x) for x in freq.strip("[]").split(",")) if freq.startswith("[") else int(freq)
        coeff = args.moe_aux_loss_coeff
        return cls(num_experts=args.num_experts, router_topk=args.moe_router_topk,
                   ffn_hidden_size=args.moe_ffn_hidden_size,
                   shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
                   shared_expert_gate=args.moe_shared_expert_gate, layer_freq=layer_freq,
                   router_score_function=args.moe_router_score_function,
                   router_pre_softmax=args.moe_router_pre_softmax,
                   router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
                   router_num_groups=args.moe_router_num_groups, router_group_topk=args.moe_router_group_topk,
                   router_dtype=args.moe_router_dtype, router_type=args.moe_router_type,
                   second_expert_policy=args.moe_second_expert_policy, input_jitter_eps=args.moe_input_jitter_eps,
                   router_enable_expert_bias=args.moe_router_enable_expert_bias,
                   router_bias_update_rate=args.moe_router_bias_update_rate,
                   load_balancing_type=tuple(args.moe_router_load_balancing_type),
                   aux_loss_coeff=coeff[0] if len(coeff) == 1 else tuple(coeff), z_loss_coeff=args.moe_z_loss_coeff,
                   expert_capacity_factor=args.moe_expert_capacity_factor,
                   token_drop_policy=args.moe_token_drop_policy,
                   pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity,
                   eval_capacity_factor=args.moe_eval_capacity_factor,
                   eval_capacity_token_fraction=args.moe_eval_capacity_token_fraction,
                   token_dispatcher_type=args.moe_token_dispatcher_type, grouped_gemm=args.moe_grouped_gemm)

    def is_moe_layer(self, layer: int, num_layers: int) -> bool:
        """Whether global layer `layer` (0-based) of `num_layers` holds experts."""
        if isinstance(self.layer_freq, int):
            return layer % self.layer_freq == 0
        if len(self.layer_freq) != num_layers:
            raise ValueError(f"--moe-layer-freq lists {len(self.layer_freq)} layers but --num-layers is {num_layers}")
        return bool(self.layer_freq[layer])

    def aux_loss_coeffs(self) -> dict[str, float]:
        """Coefficient per load-balancing type."""
        coeffs = (self.aux_loss_coeff if isinstance(self.aux_loss_coeff, tuple)
                  else (self.aux_loss_coeff,) * len(self.load_balancing_type))
        return {t: c for t, c in zip(self.load_balancing_type, coeffs) if t not in ("none", "sinkhorn")}

    def capacity(self, num_tokens: int, training: bool) -> int | None:
        """Slots per expert for a routing group of num_tokens tokens; None when dropless.

        Expert-choice routing always has a capacity (factor 1 unless given)."""
        if not training and self.eval_capacity_token_fraction is not None:
            return max(1, math.ceil(self.eval_capacity_token_fraction * num_tokens))
        factor = self.expert_capacity_factor if training or self.eval_capacity_factor is None \
            else self.eval_capacity_factor
        if factor is None and self.router_type == "expert_choice":
            factor = 1.0
        if factor is None:
            return None
        return max(1, math.ceil(num_tokens * self.router_topk / self.num_experts * factor))

