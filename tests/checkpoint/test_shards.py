"""The global placement of a rank's pieces (boxes), checked against ParamSpec.take_local and by exhaustion, and
single-process save/load details: precision of the fp32 main values, the tied copy, malicious metadata."""

import dataclasses
import itertools
import math
import os
import pickle

import pytest
import torch

from megamoe.checkpoint.checkpointer import (CheckpointConfig, check_model_shapes, find_checkpoint, load_checkpoint,
                                             save_checkpoint)
from megamoe.checkpoint.safe_reader import UnsafeCheckpointError
from megamoe.checkpoint.shards import flat_range_blocks, param_boxes, saved_shape
from megamoe.distributed.data_parallel import DDPConfig, DistributedDataParallel
from megamoe.model.gpt import GPTModel
from megamoe.moe.config import MoEConfig
from megamoe.optim.lr_scheduler import ScheduleConfig
from megamoe.optim.optimizer import MegatronOptimizer, OptimizerConfig
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.mesh import ParallelMesh
from megamoe.tensor_parallel.params import ParamSpec
from tests.model_cases import VARIANTS, make_config


@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 5), (2, 1, 3, 2)])
def test_flat_ranges_split_into_contiguous_blocks_that_cover_them_once(shape):
    n = math.prod(shape)
    ids = torch.arange(n).view(shape)
    for start, end in itertools.combinations(range(n + 1), 2):
        seen = []
        blocks = flat_range_blocks(shape, start, end)
        assert len(blocks) <= 2 * len(shape) - 1
        for flat_start, local, sizes in blocks:
            view = ids
            for d, (lo, size) in enumerate(zip(local, sizes)):
                view = view.narrow(d, lo, size)
            values = view.reshape(-1)
            assert torch.equal(values, torch.arange(flat_start, flat_start + values.numel()))  # contiguous
            seen += values.tolist()
        assert sorted(seen) == list(range(start, end))


SPECS = {
    "replicated": ParamSpec((6, 4)),
    "column": ParamSpec((8, 4), shard_dim=0, shard_index=1, shard_count=2),
    "row": ParamSpec((4, 8), shard_dim=1, shard_index=3, shard_count=4),
    "swiglu fc1 chunks": ParamSpec((16, 4), shard_dim=0, shard_index=1, shard_count=2, chunks=2),
    "experts with etp": ParamSpec((4, 8, 6), shard_dim=1, shard_index=1, shard_count=2, chunks=2, experts=(2, 2)),
    "padded vocab": ParamSpec((256, 4), shard_dim=0, shard_index=1, shard_count=2, valid_rows=150),
    "padding only": ParamSpec((256, 4), shard_dim=0, shard_index=1, shard_count=2, valid_rows=100),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_param_boxes_place_the_local_tensor_where_take_local_takes_it(name):
    spec = SPECS[name]
    full = torch.arange(math.prod(spec.global_shape), dtype=torch.float64).view(spec.global_shape)
    local = spec.take_local(full)
    rebuilt = torch.full(saved_shape(spec), -1.0, dtype=torch.float64)
    for box in param_boxes(spec):
        piece, target = local, rebuilt
        for d, (lo, off, size) in enumerate(zip(box.local, box.offsets, box.sizes)):
            piece, target = piece.narrow(d, lo, size), target.narrow(d, off, size)
        assert target.eq(-1).all(), "boxes overlap"
        target.copy_(piece)
    # every element this rank holds (except vocabulary padding) is placed, at its global position
    expected = torch.full_like(rebuilt, -1.0)
    mask = torch.zeros(spec.global_shape, dtype=torch.bool)
    spec.place_local(mask, torch.ones(spec.local_shape, dtype=torch.bool))
    rows = saved_shape(spec)[0]
    expected[mask[:rows]] = full[:rows][mask[:rows]]
    assert torch.equal(rebuilt, expected)


def _build(seed, bf16=False, tied=False):
    overrides = dict(VARIANTS["mixtral"], moe=MoEConfig(num_experts=4, router_topk=2,
                                                        router_enable_expert_bias=True,
                                                        router_score_function="sigmoid"))
    if tied:
        overrides["untie_embeddings_and_output_weights"] = False
    cfg = make_config(**overrides)
    mesh = ParallelMesh(ParallelConfig(world_size=1))
    model = GPTModel(cfg, mesh, seed=seed, dtype=torch.bfloat16 if bf16 else torch.float32)
    ddp = DistributedDataParallel(model, mesh, DDPConfig())
    optimizer = MegatronOptimizer([ddp], mesh, OptimizerConfig(bf16=bf16), ScheduleConfig(lr=1e-3, decay_iters=10))
    return cfg, mesh, model, optimizer


def _fill(model, optimizer):
    """Optimizer state and fp32 main values that bf16 cannot hold exactly (padding rows stay zero)."""
    g = torch.Generator().manual_seed(0)
    for name, p, _, main, moments in optimizer.pieces():
        for t in [main] + moments:
            values = torch.randn(p.shape, generator=g)
            if p.spec.valid_rows is not None:
                values[p.spec.valid_rows:] = 0
            t.copy_(values.view(-1))
    optimizer.write_main_to_params()
    for layer in model.modules():
        if hasattr(layer, "expert_bias"):
            layer.expert_bias.copy_(torch.randn(layer.expert_bias.shape, generator=g))


def test_bf16_run_resumes_in_fp32_with_the_fp32_main_values(tmp_path):
    cfg, mesh, model, optimizer = _build(1, bf16=True)
    _fill(model, optimizer)
    save_checkpoint(str(tmp_path), 3, [model], optimizer, mesh, {"consumed_samples": 24})
    mains = {name: main.clone() for name, _, _, main, _ in optimizer.pieces()}
    moments = {name: [m.clone() for m in ms] for name, _, _, _, ms in optimizer.pieces()}
    found = find_checkpoint(CheckpointConfig(load=str(tmp_path)))
    check_model_shapes(found, cfg)
    for bf16 in (False, True):
        _, _, other, other_optimizer = _build(2, bf16=bf16)
        load_checkpoint(found, [other], other_optimizer, mesh)
        for name, p, _, main, ms in other_optimizer.pieces():
            assert torch.equal(main, mains[name]), name  # fp32 values, not their bf16 rounding
            assert all(torch.equal(a, b) for a, b in zip(ms, moments[name])), name
            assert torch.equal(p.detach().reshape(-1), mains[name].to(p.dtype)), name
        biases = [(a.expert_bias, b.expert_bias) for a, b in zip(model.modules(), other.modules())
                  if hasattr(a, "expert_bias")]
        assert biases and all(torch.equal(a, b) for a, b in biases)
        assert other_optimizer.iteration == optimizer.iteration


def test_weights_only_load_resets_the_optimizer(tmp_path):
    _, mesh, model, optimizer = _build(1)
    _fill(model, optimizer)
    save_checkpoint(str(tmp_path), 3, [model], optimizer, mesh, {"consumed_samples": 24}, save_optim=False)
    _, _, other, other_optimizer = _build(2)
    load_checkpoint(find_checkpoint(CheckpointConfig(load=str(tmp_path))), [other], other_optimizer, mesh)
    for (n, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), n
    assert all(m.eq(0).all() for *_, ms in other_optimizer.pieces() for m in ms)


def test_model_mismatch_lists_the_first_differing_tensors(tmp_path):
    _, mesh, model, optimizer = _build(1)
    save_checkpoint(str(tmp_path), 1, [model], optimizer, mesh, {"consumed_samples": 0})
    found = find_checkpoint(CheckpointConfig(load=str(tmp_path)))
    other = make_config(**dict(VARIANTS["mixtral"], hidden_size=64, moe=MoEConfig(num_experts=4, router_topk=2)))
    with pytest.raises(ValueError, match=r"first differences\):\n  - model/decoder.final_layernorm.weight: flags "
                                         r"give \(64,\), checkpoint has \(32,\)"):
        check_model_shapes(found, other)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creating a file stands for any code a pickle could run


def test_metadata_that_would_run_code_is_refused(tmp_path):
    _, mesh, model, optimizer = _build(1)
    save_checkpoint(str(tmp_path), 1, [model], optimizer, mesh, {"consumed_samples": 0})
    marker = tmp_path / "pwned"
    with open(tmp_path / "iter_0000001" / ".metadata", "wb") as f:
        pickle.dump(_RunsCode(str(marker)), f)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load io.open"):
        find_checkpoint(CheckpointConfig(load=str(tmp_path)))
    assert not marker.exists()


def test_tracker_and_partial_saves(tmp_path):
    _, mesh, model, optimizer = _build(1)
    save_checkpoint(str(tmp_path), 2, [model], optimizer, mesh, {"consumed_samples": 0})
    os.makedirs(tmp_path / "iter_0000004.tmp")  # a save that was killed
    found = find_checkpoint(CheckpointConfig(load=str(tmp_path)))
    assert found.iteration == 2 and "iter_0000004.tmp: a save that did not finish" in found.messages[0]
    assert open(tmp_path / "latest_checkpointed_iteration.txt").read() == "2"
    with pytest.raises(FileNotFoundError, match="--ckpt-step"):
        find_checkpoint(CheckpointConfig(load=str(tmp_path), ckpt_step=4))
    with pytest.raises(FileNotFoundError, match="--load .* does not exist"):
        find_checkpoint(CheckpointConfig(load=str(tmp_path / "nothing")))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="has no latest_checkpointed_iteration.txt"):
        find_checkpoint(CheckpointConfig(load=str(tmp_path / "empty")))
    # resuming into the directory the run saves to: starting fresh is what was asked for
    assert find_checkpoint(CheckpointConfig(load=str(tmp_path / "empty"), save=str(tmp_path / "empty"))) is None
    with pytest.raises(FileNotFoundError):
        find_checkpoint(CheckpointConfig(load=str(tmp_path / "empty"), save=str(tmp_path / "empty"),
                                         exit_on_missing_checkpoint=True))


def test_tied_embedding_is_saved_once_and_fills_the_last_stage_copy(tmp_path):
    cfg, mesh, model, optimizer = _build(1, tied=True)
    save_checkpoint(str(tmp_path), 1, [model], optimizer, mesh, {"consumed_samples": 0})
    found = find_checkpoint(CheckpointConfig(load=str(tmp_path)))
    assert "model/output_layer.weight" not in found.shapes
    assert found.shapes["model/embedding.word_embeddings.weight"] == (300, 32)
    check_model_shapes(found, dataclasses.replace(cfg))
