"""A model split into pipeline stages (contiguous layer ranges) computes what the whole model computes."""

import pytest
import torch

from megamoe.model.gpt import GPTModel
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.mesh import ParallelMesh
from tests.model_cases import SEED, VARIANTS, batch, make_config


@pytest.mark.parametrize("variant", ["mixtral", "gpt"])  # untied and tied embeddings
def test_stages_compose_to_the_whole_model(variant):
    cfg = make_config(**dict(VARIANTS[variant], num_layers=4))
    mesh = ParallelMesh(ParallelConfig(world_size=1))
    whole = GPTModel(cfg, mesh, seed=SEED)
    stages = [GPTModel(cfg, mesh, seed=SEED, layer_numbers=r) for r in (range(0, 1), range(1, 3), range(3, 4))]
    assert [s.pre_process for s in stages] == [True, False, False]
    assert [s.post_process for s in stages] == [False, False, True]
    # every stage parameter has the whole model's name and value
    whole_params = dict(whole.named_parameters())
    for stage in stages:
        for name, param in stage.named_parameters():
            source = whole_params.get(name, whole_params["embedding.word_embeddings.weight"])
            assert torch.equal(param, source), name
    ids, labels = batch(cfg)
    hidden = stages[0](ids)
    hidden = stages[1](hidden_states=hidden)
    assert torch.equal(stages[2](hidden_states=hidden, labels=labels), whole(ids, labels=labels))
