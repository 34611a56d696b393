"""Device-to-host transfers in the MoE path: none per layer with a capacity, exactly one when dropless.

On a CPU nothing waits for a device, so the syncs are counted where they would happen on a GPU: every call that
turns a tensor into Python numbers (item, tolist, bool/int/float of a tensor) or sizes an output by its data
(nonzero, masked_select).
"""

import contextlib

import pytest
import torch

from megamoe.model.config import ModelConfig
from megamoe.moe.config import MoEConfig
from megamoe.moe.layer import MoELayer
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.mesh import ParallelMesh
from megamoe.tensor_parallel.params import initialize_parameters

SYNCING_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")
SYNCING_FUNCTIONS = ("nonzero", "masked_select", "unique")


@contextlib.contextmanager
def count_host_syncs():
    calls = []
    saved = {}

    def counting(owner, name):
        original = getattr(owner, name)
        saved[owner, name] = original

        def wrapper(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    for name in SYNCING_METHODS:
        counting(torch.Tensor, name)
    for name in SYNCING_FUNCTIONS:
        counting(torch, name)
    try:
        yield calls
    finally:
        for (owner, name), original in saved.items():
            setattr(owner, name, original)


def layer(**moe):
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=64, swiglu=True,
                      add_bias_linear=False, moe=MoEConfig(num_experts=4, router_topk=2, aux_loss_coeff=0.01, **moe))
    module = MoELayer(cfg, ParallelMesh(ParallelConfig(world_size=1)), 0)
    initialize_parameters(module, seed=0)
    return module


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
@pytest.mark.parametrize("capacity, expected", [(dict(expert_capacity_factor=1.0), 0),
                                                (dict(expert_capacity_factor=1.5, pad_expert_input_to_capacity=True), 0),
                                                (dict(), 1)])
def test_host_syncs_per_moe_layer(dispatcher, capacity, expected):
    moe = layer(token_dispatcher_type=dispatcher, **capacity)
    x = torch.randn(8, 2, 32, requires_grad=True)
    moe(x).sum().backward()  # warm-up outside the count
    with count_host_syncs() as calls:
        moe(x).sum().backward()
    assert len(calls) == expected, calls


def test_the_counter_sees_a_sync():
    with count_host_syncs() as calls:
        torch.ones(2).sum().item()
        torch.nonzero(torch.ones(2))
    assert calls == ["item", "nonzero"]
