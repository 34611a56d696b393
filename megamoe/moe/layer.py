"""MoELayer: router -> dispatcher -> grouped experts -> combine (+ shared experts). Fills a layer's MLP slot."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.model.config import ModelConfig
from megamoe.model.mlp import MLP
from megamoe.moe.dispatcher import AllGatherDispatcher, AllToAllDispatcher
from megamoe.moe.experts import GroupedExperts
from megamoe.moe.losses import attach_aux_loss
from megamoe.moe.metrics import routing_metrics
from megamoe.moe.router import TopKRouter
from megamoe.parallel.mesh import ParallelMesh
from megamoe.tensor_parallel.params import ParamSpec, new_param
from megamoe.tensor_parallel.random import DropoutContext


class MoELayer(nn.Module):
    """A Mixture-of-Experts MLP over [s(/tp), b, h] activations.

    Attributes:
        aux_loss_scale: the gradient given to the router losses in backward; the schedule sets it so they are
            scaled like the main loss (e.g. 1 / number of micro-batches).
        metrics: the last forward's routing metrics (metrics.py) and aux loss, detached.
    """

    def __init__(self, config: ModelConfig, mesh: ParallelMesh, layer_number: int, device=None, dtype=None) -> None:
        super().__init__()
        moe, sp = config.moe, mesh.config.sequence_parallel
        self.layer_number, self.aux_loss_scale, self.metrics = layer_number, 1.0, {}
        self.router = TopKRouter(config.hidden_size, moe, mesh["tp"], sp, config.init_method_std, layer_number,
                                 device, dtype, dp_group=mesh["dp_cp"])
        self.experts = GroupedExperts(config, mesh["ep"], mesh["etp"], device, dtype)
        if moe.token_dispatcher_type == "allgather":
            self.dispatcher = AllGatherDispatcher(mesh["tp_ep"], moe.num_experts, self.experts.num_local,
                                                  mesh.coordinates["ep"])
        else:
            self.dispatcher = AllToAllDispatcher(mesh["ep"], mesh["etp"], mesh["tp_ep"], moe.num_experts)
        self.shared_experts = None
        if moe.shared_expert_intermediate_size:
            self.shared_experts = MLP(config, mesh["tp"], sp, moe.shared_expert_intermediate_size, device, dtype)
            self.shared_expert_gate = (
                new_param(ParamSpec((1, config.hidden_size), std=config.init_method_std, sequence_parallel=sp),
                          device, dtype) if moe.shared_expert_gate else None)

    def forward(self, x: torch.Tensor, dropout_ctx: DropoutContext | None = None) -> torch.Tensor:
        """x: [s(/tp), b, h] -> [s(/tp), b, h]. dropout_ctx names the micro-batch's tokens for random routing."""
        with torch.profiler.record_function(f"moe.layer{self.layer_number}"):  # a scope in profiler traces
            return self._forward(x, dropout_ctx)

    def _forward(self, x: torch.Tensor, dropout_ctx: DropoutContext | None) -> torch.Tensor:
        s, b, h = x.shape
        tokens = x.reshape(s * b, h)                                   # [s b, h], sequence-major like the routing
        routing = self.router(tokens, batch=b, ctx=dropout_ctx)
        out = self.dispatcher(tokens, routing.probs, routing.routing_map, self.experts,
                              routing.capacity).view(s, b, h)
        if torch._C._current_graph_task_id() == -1:  # not again when backward recomputes the forward
            self._record_metrics(routing)
        if routing.aux_loss is not None:
            out = attach_aux_loss(out, routing.aux_loss, self.aux_loss_scale)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(F.linear(x, self.shared_expert_gate))
            out = out + shared
        return out


    def _record_metrics(self, routing) -> None:
        self.metrics = routing_metrics(routing.stats["scores"], routing.stats["routed"], routing.stats["kept"])
        if "expert_bias" in routing.stats:
            self.metrics["expert_bias"] = routing.stats["expert_bias"]
        for loss in ("load_balancing_loss", "z_loss"):  # each already times its coefficient
            if loss in routing.stats:
                self.metrics[loss] = routing.stats[loss]


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers, in layer order."""
    return sorted((m for m in model.modules() if isinstance(m, MoELayer)), key=lambda m: m.layer_number)


def end_of_step(model: nn.Module, mesh: ParallelMesh) -> None:
    """Once per optimizer step, after the last backward (finalize_grads calls it): updates expert biases
    (--moe-router-enable-expert-bias) and starts a new step for global_aux_loss."""
    for layer in moe_layers(model):
        router = layer.router
        if router.moe.router_enable_expert_bias:
            router.update_expert_bias(mesh["dp_cp"])
        if "global_aux_loss" in router.moe.load_balancing_type:
            router.reset_step_load()


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """The gradient the router losses get in backward, e.g. 1 / micro-batches per step (like the main loss)."""
    for layer in moe_layers(model):
        layer.aux_loss_scale = scale
