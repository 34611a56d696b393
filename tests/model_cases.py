"""Tiny model configurations and one forward/backward, shared by the single-process and multi-rank model tests."""

import math

import torch
import torch.distributed as dist

from megamoe.model.accounting import local_parameter_count, parameter_counts
from megamoe.model.config import ModelConfig
from megamoe.model.gpt import GPTModel
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.mesh import ParallelMesh

BASE = dict(num_layers=2, hidden_size=32, num_attention_heads=8, vocab_size=300, seq_length=8,
            hidden_dropout=0.0, attention_dropout=0.0)
# Named variants: each toggles several features at once, so a few of them cover every feature.
VARIANTS = {
    "mixtral": dict(num_query_groups=4, position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                    untie_embeddings_and_output_weights=True, add_bias_linear=False),
    "gpt": dict(),  # learned positions, LayerNorm, GELU, tied embeddings, biases, one kv head per query head
    "gqa2": dict(num_query_groups=2, position_embedding_type="rope", rotary_percent=0.5, swiglu=True),
    "nopos": dict(position_embedding_type="none", normalization="RMSNorm", untie_embeddings_and_output_weights=True),
    "mqa": dict(num_query_groups=1, position_embedding_type="rope"),
}
SEED = 1234


def make_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, **overrides})


def batch(cfg: ModelConfig, b: int = 2, micro_batch: int = 0):
    g = torch.Generator().manual_seed(7 + micro_batch)
    ids = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length), generator=g)
    return ids, labels


def run_model(model_kwargs: dict, sequence_parallel: bool = False, training: bool = False,
              parallel: dict | None = None, micro_batch: int | None = None) -> dict:
    """Build the model on this world, run one micro-batch forward and backward, return this rank's results.

    parallel: ParallelConfig sizes (default: tp = world size). Each data-parallel replica runs its own micro-batch
    (number = its dp coordinate, unless micro_batch is given).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    parallel = parallel if parallel is not None else dict(tp=world, sequence_parallel=sequence_parallel)
    mesh = ParallelMesh(ParallelConfig(world_size=world, **parallel))
    cfg = make_config(**model_kwargs)
    model = GPTModel(cfg, mesh, seed=SEED)
    model.train(training)
    micro_batch = mesh.coordinates["dp"] if micro_batch is None else micro_batch
    ids, labels = batch(cfg, micro_batch=micro_batch)
    sample_ids = torch.arange(ids.shape[0]) + micro_batch * ids.shape[0]
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = model(ids, sample_ids=sample_ids).detach()
    loss = model(ids, labels=labels, sample_ids=sample_ids)
    loss.mean().backward()
    moe_metrics = {name: {k: v.clone() for k, v in module.metrics.items()}
                   for name, module in model.named_modules() if hasattr(module, "metrics")}
    return {
        "coords": mesh.coordinates,
        "moe_metrics": moe_metrics,
        "logits": logits,
        "loss": loss.detach(),
        "params": initial,
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "specs": {n: p.spec for n, p in model.named_parameters()},
        "count": local_parameter_count(model),
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference in norm."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


VOCAB_TABLES = ("embedding.word_embeddings.weight", "output_layer.weight")


def _padded(ref: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    # The vocabulary is padded per tp (Megatron's rule); padding rows are zero.
    if ref.shape[0] >= shape[0]:
        return ref[:shape[0]]
    return torch.cat([ref, ref.new_zeros((shape[0] - ref.shape[0],) + ref.shape[1:])])


def check_against_single_process(model_kwargs: dict, per_rank: list[dict], training: bool = False) -> None:
    """Compare a multi-rank run (one micro-batch per data-parallel replica) with one process running the same
    micro-batches in turn: per replica logits, per-token loss and MoE routing; every initial shard bitwise; every
    parameter's gradient summed over replicas (what the data-parallel reduction will sum)."""
    dp = 1 + max(r["coords"]["dp"] for r in per_rank)
    refs = [run_model(model_kwargs, training=training, micro_batch=d) for d in range(dp)]
    cfg = make_config(**model_kwargs)
    v = cfg.vocab_size
    for d, ref in enumerate(refs):
        replica = sorted((r for r in per_rank if r["coords"]["dp"] == d), key=lambda r: r["coords"]["tp"])
        logits = torch.cat([r["logits"] for r in replica], dim=-1)
        assert rel(logits[..., :v], ref["logits"][..., :v]) < 1e-5, f"logits of replica {d}"
        for r in replica:
            assert rel(r["loss"], ref["loss"]) < 1e-5, f"loss of replica {d}"
            for layer, metrics in ref["moe_metrics"].items():  # routing decisions of the whole micro-batch
                got = r["moe_metrics"][layer]
                assert torch.equal(got["tokens_per_expert"], metrics["tokens_per_expert"]), layer
                assert torch.equal(got["dropped_fraction"], metrics["dropped_fraction"]), layer
    tp = 1 + max(r["coords"]["tp"] for r in per_rank)
    if len(per_rank) == tp:  # tp only: per-rank counts add up once replicated parameters are counted once
        replicated = sum(math.prod(s.global_shape) for s in per_rank[0]["specs"].values() if s.shard_dim is None)
        assert sum(r["count"] for r in per_rank) - (tp - 1) * replicated == parameter_counts(cfg, tp).total
    for name, ref_param in refs[0]["params"].items():
        rows = v if name in VOCAB_TABLES else None
        spec0 = per_rank[0]["specs"][name]
        total = torch.zeros(spec0.global_shape)
        for r in per_rank:
            spec = r["specs"][name]
            expected = spec.take_local(_padded(ref_param, spec.global_shape))
            assert torch.equal(r["params"][name], expected), f"initial {name} on rank {per_rank.index(r)}"
            copy_of_tp0 = spec.shard_dim is None and not spec.sequence_parallel and r["coords"]["tp"] != 0
            if copy_of_tp0:  # replicated over tp with the whole input: the same gradient as tp rank 0
                continue
            placed = torch.zeros(spec.global_shape)
            spec.place_local(placed, r["grads"][name])
            total += placed
        ref_grad = sum(ref["grads"][name] for ref in refs)
        assert rel(total[:rows], ref_grad[:rows]) < 1e-5, f"grad {name}"
