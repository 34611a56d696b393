"""Dense -> MoE upcycling of a checkpoint (Megatron-LM's --moe-use-upcycling; FastMoE's fmoefy in checkpoint form).

Every dense MLP becomes an MoE layer whose experts start as copies of it, so the upcycled model computes what the
dense one did at step 0. With granularity G (--moe-upcycling-granularity, Megatron's "virtual groups"), the MLP's
hidden dimension is cut into G slices; expert e = c G + g holds slice g of copy c, its output projection
multiplied by G, and the router rows of the G experts of copy c are the same random row. The top-k router then
picks whole copies (k must be a multiple of G), each slice of copy c weighs softmax_c / G, and
    sum_c softmax_c / G * sum_g G * fc2_g(act(fc1_g x)) = sum_c softmax_c * MLP(x) = MLP(x).
This needs routing weights that sum to one over the chosen experts: megamoe's (and Mixtral's) default softmax over
the top-k logits, without capacity drops at step 0.
"""

from __future__ import annotations

import dataclasses

import torch

from megamoe.checkpoint.hf import model_config_from_dict
from megamoe.checkpoint.offline import CheckpointReader, LazyTensor, write_checkpoint
from megamoe.model.config import ModelConfig
from megamoe.moe.config import MoEConfig
from megamoe.tensor_parallel.params import name_seed


def upcycled_model(dense: ModelConfig, moe: MoEConfig, granularity: int = 1) -> ModelConfig:
    """The MoE model an upcycling of `dense` gives; raises naming the flags when it cannot equal the dense one."""
    problems = []
    if dense.moe is not None:
        problems.append("the checkpoint is already an MoE model")
    if dense.add_bias_linear:
        problems.append("experts have no biases: the dense model must have been trained with --disable-bias-linear")
    if granularity < 1 or moe.num_experts % granularity or moe.router_topk % granularity \
            or dense.ffn_hidden_size % granularity:
        problems.append(f"--moe-upcycling-granularity {granularity} must divide --num-experts {moe.num_experts}, "
                        f"--moe-router-topk {moe.router_topk} and --ffn-hidden-size {dense.ffn_hidden_size}")
    expected_ffn = dense.ffn_hidden_size // max(granularity, 1)
    if (moe.ffn_hidden_size or dense.ffn_hidden_size) != expected_ffn:
        problems.append(f"--moe-ffn-hidden-size must be --ffn-hidden-size / granularity = {expected_ffn}")
    if moe.router_score_function != "softmax" or moe.router_pre_softmax or moe.router_topk_scaling_factor \
            or moe.router_type != "topk" or moe.shared_expert_intermediate_size or moe.layer_freq != 1:
        problems.append("upcycling keeps the dense output only with the plain softmax top-k router (no "
                        "--moe-router-pre-softmax, scaling factor, expert choice or shared experts) in every layer")
    if problems:
        raise ValueError("cannot upcycle:\n  - " + "\n  - ".join(problems))
    return dataclasses.replace(dense, moe=dataclasses.replace(moe, ffn_hidden_size=expected_ffn))


def upcycle(dense_checkpoint: str, save_root: str, moe: MoEConfig, granularity: int = 1, seed: int = 1234,
            iteration: int = 0) -> tuple[str, ModelConfig]:
    """Write the upcycled MoE checkpoint of a dense megamoe checkpoint. Returns (directory, MoE ModelConfig)."""
    reader = CheckpointReader(dense_checkpoint)
    dense = model_config_from_dict(reader.common["model"])
    model = upcycled_model(dense, moe, granularity)
    g, experts = granularity, moe.num_experts
    tensors = {}
    for key in reader.keys("model/"):
        name = key.removeprefix("model/")
        if name.endswith("mlp.linear_fc1.weight"):
            prefix = key.removesuffix("linear_fc1.weight")
            fc1, fc2 = key, prefix + "linear_fc2.weight"
            h = dense.hidden_size
            rows = reader.shape(fc1)[0]
            tensors[prefix + "experts.linear_fc1.weight"] = LazyTensor(
                (experts, rows // g, h), reader.dtype(fc1), lambda k=fc1: _fc1_slices(reader.read(k), g, experts,
                                                                                       dense.swiglu))
            tensors[prefix + "experts.linear_fc2.weight"] = LazyTensor(
                (experts, h, dense.ffn_hidden_size // g), reader.dtype(fc2),
                lambda k=fc2: _fc2_slices(reader.read(k), g, experts))
            tensors[prefix + "router.weight"] = LazyTensor(
                (experts, h), reader.dtype(fc1),
                lambda n=prefix + "router.weight": _router(seed, n, experts, g, h, dense.init_method_std))
        elif not name.endswith("mlp.linear_fc2.weight"):  # (fc2 went into the experts with fc1)
            tensors[key] = LazyTensor(reader.shape(key), reader.dtype(key), lambda k=key: reader.read(k))
    path = write_checkpoint(save_root, iteration, tensors, {
        "model": dataclasses.asdict(model), "upcycled_from": reader.path, "upcycling_granularity": granularity})
    return path, model


def _fc1_slices(fc1: torch.Tensor, g: int, experts: int, swiglu: bool) -> torch.Tensor:
    halves = fc1.chunk(2, dim=0) if swiglu else (fc1,)                       # [gate; up] or [fc1]
    slices = [torch.cat([half.chunk(g, dim=0)[s] for half in halves]) for s in range(g)]
    return torch.stack([slices[e % g] for e in range(experts)])              # expert e = copy e // g, slice e % g


def _fc2_slices(fc2: torch.Tensor, g: int, experts: int) -> torch.Tensor:
    slices = [piece * g for piece in fc2.chunk(g, dim=1)]
    return torch.stack([slices[e % g] for e in range(experts)])


def _router(seed: int, name: str, experts: int, g: int, hidden: int, std: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(name_seed(seed, name))
    rows = torch.empty(experts // g, hidden).normal_(0.0, std, generator=generator)
    return rows.repeat_interleave(g, dim=0)                                  # one row per copy, shared by its slices
