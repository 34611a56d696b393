"""The DCP state dict of a rank: every tensor under its global name, as GlobalShards.

Keys (the same whatever the layout):
    model/<parameter or buffer name>         the model's values, in the model's dtype
    optimizer/main/<parameter name>          fp32 main values (saved when the model is not fp32)
    optimizer/<exp_avg|exp_avg_sq|momentum>/<parameter name>
    rng/rank<r>                              torch's CPU generator state of rank r
Parameter names are Megatron-Core's with global layer numbers; experts are the rows of dim 0 of their global
tensor [num_experts, ...]. A tied output layer on the last pipeline stage is stored under the word embedding's
name (the two are equal, and only the embedding saves it: DCP wants the saved pieces of a tensor to cover it
exactly once), so a checkpoint does not depend on where the pipeline splits.
"""

from __future__ import annotations

import torch
from torch import nn

from megamoe.checkpoint.shards import GlobalShards, flat_range_blocks, param_boxes, saved_shape


def global_name(name: str, param: nn.Parameter) -> str:
    """The name a parameter is stored under: a tied copy takes the tensor it copies (its init_key)."""
    return param.spec.init_key or name


def _shards(state: dict, key: str, shape, dtype) -> GlobalShards:
    if key not in state:
        state[key] = GlobalShards(shape, dtype)
    return state[key]


def _is_tied_copy(p: nn.Parameter) -> bool:
    return p.spec.init_key is not None


def model_state(chunks: list[nn.Module], saving: bool) -> dict:
    """model/<name> for every parameter and buffer of this rank's chunks: the whole local tensors."""
    state = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if saving and _is_tied_copy(p):
                continue
            shards = _shards(state, f"model/{global_name(name, p)}", saved_shape(p.spec), p.dtype)
            shards.add_boxes(p.data, param_boxes(p.spec))
        for name, b in chunk.named_buffers():
            _shards(state, f"model/{name}", tuple(b.shape), b.dtype).add((0,) * b.dim(), b)
    return state


def optimizer_state(optimizer, slots: tuple[str, ...], saving: bool, key_of=None) -> dict:
    """optimizer/<slot>/<name> for this rank's optimizer pieces; slot "main" is the fp32 main values, the others
    optimizer.state_names. key_of(slot, name) overrides the key (e.g. to read main values from model/<name>)."""
    key_of = key_of or (lambda slot, name: f"optimizer/{slot}/{name}")
    state = {}
    for name, p, (start, end), main, moments in optimizer.pieces():
        if saving and _is_tied_copy(p):
            continue
        tensors = dict(zip(optimizer.state_names, moments), main=main)
        boxes = param_boxes(p.spec)
        for slot in slots:
            flat = tensors[slot]
            shards = _shards(state, key_of(slot, global_name(name, p)), saved_shape(p.spec), flat.dtype)
            for flat_start, local, sizes in flat_range_blocks(p.spec.local_shape, start, end):
                block = flat[flat_start - start:flat_start - start + torch.Size(sizes).numel()].view(sizes)
                shards.add_boxes(block, boxes, local)
    return state


def rng_state(rank: int) -> dict:
    generator = torch.get_rng_state()
    shards = GlobalShards(tuple(generator.shape), generator.dtype)
    shards.add((0,), generator)
    return {f"rng/rank{rank}": shards}
