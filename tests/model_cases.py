"""Tiny model configurations and one forward/backward, shared by the single-process and multi-rank model tests."""

import torch
import torch.distributed as dist

from megamoe.model.accounting import local_parameter_count
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


def batch(cfg: ModelConfig, b: int = 2):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (b, cfg.seq_length), generator=g)
    return ids, labels


def run_model(model_kwargs: dict, sequence_parallel: bool = False, training: bool = False) -> dict:
    """Build the model on this world (tp = world size), run one forward and backward, return local results."""
    tp = dist.get_world_size() if dist.is_initialized() else 1
    mesh = ParallelMesh(ParallelConfig(world_size=tp, tp=tp, sequence_parallel=sequence_parallel))
    cfg = make_config(**model_kwargs)
    model = GPTModel(cfg, mesh, seed=SEED)
    model.train(training)
    ids, labels = batch(cfg)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = model(ids).detach()
    loss = model(ids, labels=labels)
    loss.mean().backward()
    return {
        "logits": logits,
        "loss": loss.detach(),
        "params": initial,
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "specs": {n: p.spec for n, p in model.named_parameters()},
        "count": local_parameter_count(model),
    }
