"""MoEConfig: which layers are Mixture-of-Experts layers and the size of their experts (Megatron-LM's --moe-* flags).

The router, capacity and dispatcher options join this config with the MoE layer itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEConfig:
    """Attributes (Megatron-LM flag in brackets):
        num_experts: experts per MoE layer [--num-experts].
        router_topk: experts each token is sent to [--moe-router-topk].
        ffn_hidden_size: hidden size of one expert; None means the model's ffn_hidden_size [--moe-ffn-hidden-size].
        shared_expert_intermediate_size: total hidden size of the shared experts, None for none
            [--moe-shared-expert-intermediate-size].
        layer_freq: which layers are MoE: an int k means every k-th layer (layers 0, k, 2k, ...), a list of 0/1 per
            layer gives the pattern [--moe-layer-freq].
    """

    num_experts: int
    router_topk: int = 2
    ffn_hidden_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    layer_freq: int | tuple[int, ...] = 1

    def __post_init__(self) -> None:
        if isinstance(self.layer_freq, list):
            object.__setattr__(self, "layer_freq", tuple(self.layer_freq))
        problems = []
        if self.num_experts < 1:
            problems.append(f"--num-experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.router_topk <= self.num_experts:
            problems.append(f"--moe-router-topk={self.router_topk} must be between 1 and --num-experts="
                            f"{self.num_experts}")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size < 1:
            problems.append(f"--moe-ffn-hidden-size must be >= 1, got {self.ffn_hidden_size}")
        if isinstance(self.layer_freq, int) and self.layer_freq < 1:
            problems.append(f"--moe-layer-freq must be >= 1 or a 0/1 list, got {self.layer_freq}")
        if isinstance(self.layer_freq, tuple) and not set(self.layer_freq) <= {0, 1}:
            problems.append(f"--moe-layer-freq list must hold only 0 and 1, got {list(self.layer_freq)}")
        if problems:
            raise ValueError("invalid MoE config:\n  - " + "\n  - ".join(problems))

    def is_moe_layer(self, layer: int, num_layers: int) -> bool:
        """Whether global layer `layer` (0-based) of `num_layers` holds experts."""
        if isinstance(self.layer_freq, int):
            return layer % self.layer_freq == 0
        if len(self.layer_freq) != num_layers:
            raise ValueError(f"--moe-layer-freq lists {len(self.layer_freq)} layers but --num-layers is {num_layers}")
        return bool(self.layer_freq[layer])
