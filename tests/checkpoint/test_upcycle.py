"""Upcycling: the MoE model made from a dense checkpoint gives the dense model's logits at step 0, with
granularity 1 (copies) and 2 (virtual groups), and resumes training under an expert-parallel layout."""

import dataclasses

import pytest
import torch

from megamoe.checkpoint.checkpointer import (CheckpointConfig, check_model_shapes, find_checkpoint, load_checkpoint,
                                             save_checkpoint)
from megamoe.checkpoint.upcycle import upcycle, upcycled_model
from megamoe.distributed.data_parallel import DDPConfig, DistributedDataParallel
from megamoe.model.gpt import GPTModel
from megamoe.moe.config import MoEConfig
from megamoe.optim.lr_scheduler import ScheduleConfig
from megamoe.optim.optimizer import MegatronOptimizer, OptimizerConfig
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.mesh import ParallelMesh
from tests.model_cases import VARIANTS, batch, make_config

DENSE = make_config(**VARIANTS["mixtral"], ffn_hidden_size=64)
MESH = ParallelMesh(ParallelConfig(world_size=1), standalone=True)


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    model = GPTModel(DENSE, MESH, seed=3)
    with torch.no_grad():  # a trained-looking dense model: norms away from 1
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    optimizer = MegatronOptimizer([DistributedDataParallel(model, MESH, DDPConfig())], MESH, OptimizerConfig(),
                                  ScheduleConfig(lr=1e-3, decay_iters=10))
    save_checkpoint(str(root), 7, [model], optimizer, MESH, {"consumed_samples": 0,
                                                              "model": dataclasses.asdict(DENSE)})
    ids, _ = batch(DENSE)
    with torch.no_grad():
        return root, ids, model.eval()(ids)


@pytest.mark.parametrize("granularity, experts, topk", [(1, 4, 2), (2, 8, 4), (4, 8, 4)])
def test_upcycled_model_equals_the_dense_one(dense_checkpoint, tmp_path, granularity, experts, topk):
    root, ids, expected = dense_checkpoint
    path, moe_model = upcycle(str(root), str(tmp_path), MoEConfig(num_experts=experts, router_topk=topk,
                              ffn_hidden_size=64 // granularity), granularity=granularity, seed=5)
    found = find_checkpoint(CheckpointConfig(load=str(tmp_path)))
    check_model_shapes(found, moe_model)
    model = GPTModel(moe_model, MESH, seed=11).eval()
    load_checkpoint(found, [model], None, MESH)
    with torch.no_grad():
        got = model(ids)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    # the routing is not trivial: more than k experts get tokens
    routed = [layer.metrics["tokens_per_expert"] for layer in model.modules() if hasattr(layer, "router")]
    assert all((counts > 0).sum() > topk for counts in routed)


def test_impossible_upcycling_names_the_flags():
    with pytest.raises(ValueError, match="--moe-upcycling-granularity 3 must divide"):
        upcycled_model(DENSE, MoEConfig(num_experts=4, router_topk=2), 3)
    with pytest.raises(ValueError, match="plain softmax top-k router"):
        upcycled_model(DENSE, MoEConfig(num_experts=4, router_topk=2, router_pre_softmax=True), 1)


def test_upcycle_tool(dense_checkpoint, tmp_path, capsys):
    from tools.checkpoint.upcycle import main

    root, _, _ = dense_checkpoint
    assert main(["--load-dir", str(root), "--save-dir", str(tmp_path), "--num-experts", "4"]) == 0
    assert "--num-experts 4 --moe-router-topk 2" in capsys.readouterr().out
    assert (tmp_path / "iter_0000000" / "common.json").exists()
    assert main(["--load-dir", str(tmp_path), "--save-dir", str(tmp_path / "again"), "--num-experts", "4"]) == 2
    assert "already an MoE model" in capsys.readouterr().err
