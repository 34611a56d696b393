"""Where each piece of a rank's tensors lies in the global tensor, in the form torch.distributed.checkpoint reads.

A rank's tensors are pieces of global tensors (invariant 4 of design/ARCHITECTURE.md): a tp shard, an expert
range, SwiGLU's [gate_r; up_r] rows, or, for the distributed optimizer, a flat range of a parameter's local
shard. Each is described here as boxes: a box is a rectangular block of the local tensor, its offsets in the
global tensor and its sizes. GlobalShards hands such boxes to DCP (its _Checkpointable hooks), so the default
planners write each box once (replicas share the same offsets and are deduplicated) and, on load, read every
box from whatever boxes another layout saved.

The global tensor of a vocabulary table is its real rows only (valid_rows): the padding depends on tp and holds
zeros, so it is neither saved nor read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from megamoe.tensor_parallel.params import ParamSpec


@dataclass(frozen=True)
class Box:
    """A block of a local tensor: starts at `local` there, at `offsets` in the global tensor, of `sizes`."""

    local: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def intersect(self, local: tuple[int, ...], sizes: tuple[int, ...]) -> "Box | None":
        """The part of this box inside the local block [local, local + sizes)."""
        lo = [max(a, b) for a, b in zip(self.local, local)]
        hi = [min(a + n, b + m) for a, n, b, m in zip(self.local, self.sizes, local, sizes)]
        if any(h <= l for l, h in zip(lo, hi)):
            return None
        return Box(tuple(lo), tuple(o + l - a for o, l, a in zip(self.offsets, lo, self.local)),
                   tuple(h - l for l, h in zip(lo, hi)))


def saved_shape(spec: ParamSpec) -> tuple[int, ...]:
    """The global tensor a checkpoint holds for a parameter: its global shape without vocabulary padding."""
    shape = list(spec.global_shape)
    if spec.valid_rows is not None:
        shape[0] = spec.valid_rows
    return tuple(shape)


def param_boxes(spec: ParamSpec) -> list[Box]:
    """The boxes of a whole local parameter: one per chunk of its shard dimension, experts placed at their global
    index, rows past valid_rows (vocabulary padding) left out."""
    local_shape = spec.local_shape
    first_expert = spec.experts[0] if spec.experts is not None else 0
    if spec.shard_dim is None:
        blocks = [(0, 0, None)]
    else:
        d = spec.shard_dim
        width = local_shape[d] // spec.chunks
        stride = spec.global_shape[d] // spec.chunks
        blocks = [(j * width, j * stride + spec.shard_index * width, width) for j in range(spec.chunks)]
    boxes = []
    for local_start, global_start, width in blocks:
        local, offsets, sizes = [0] * len(local_shape), [0] * len(local_shape), list(local_shape)
        offsets[0] = first_expert
        if width is not None:
            local[spec.shard_dim], offsets[spec.shard_dim], sizes[spec.shard_dim] = local_start, global_start, width
        box = Box(tuple(local), tuple(offsets), tuple(sizes))
        if spec.valid_rows is not None:  # clip to the real rows (dim 0 is never the expert dim of a vocab table)
            rows = spec.valid_rows - box.offsets[0]
            if rows <= 0:
                continue
            box = Box(box.local, box.offsets, (min(rows, box.sizes[0]),) + box.sizes[1:])
        boxes.append(box)
    return boxes


def flat_range_blocks(shape: tuple[int, ...], start: int, end: int) -> list[tuple[int, tuple[int, ...],
                                                                              tuple[int, ...]]]:
    """Split the flat (row-major) range [start, end) of a tensor of `shape` into blocks, each contiguous in
    memory: (flat start, local start, sizes). At most 2 x ndim - 1 blocks."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [(start, (start,), (end - start,))]
    inner = math.prod(shape[1:])
    first, last = start // inner, (end - 1) // inner

    def within(row: int, a: int, b: int):
        return [(row * inner + f, (row,) + loc, (1,) + sz) for f, loc, sz in flat_range_blocks(shape[1:], a, b)]

    if first == last:
        return within(first, start - first * inner, end - first * inner)
    out = []
    if start % inner:
        out += within(first, start % inner, inner)
        first += 1
    full_end = last + 1 if end % inner == 0 else last
    if full_end > first:
        out.append((first * inner, (first,) + (0,) * (len(shape) - 1), (full_end - first,) + tuple(shape[1:])))
    if end % inner:
        out += within(last, 0, end % inner)
    return out


class GlobalShards:
    """Pieces of one global tensor held by this rank, as DCP's _Checkpointable: tensors (views where possible)
    with their offsets. Saving writes each piece; loading copies into each piece in place."""

    def __init__(self, global_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.global_shape, self.dtype = torch.Size(global_shape), dtype
        self.pieces: dict[tuple[int, ...], torch.Tensor] = {}

    def add(self, offsets: tuple[int, ...], tensor: torch.Tensor) -> None:
        self.pieces[tuple(offsets)] = tensor

    def add_boxes(self, tensor: torch.Tensor, boxes: list[Box], local_start: tuple[int, ...] | None = None) -> None:
        """Add the parts of `tensor` (a block of the local tensor starting at local_start) that the boxes cover."""
        local_start = local_start or (0,) * tensor.dim()
        for box in boxes:
            part = box.intersect(local_start, tuple(tensor.shape))
            if part is None:
                continue
            view = tensor
            for d, (lo, size, base) in enumerate(zip(part.local, part.sizes, local_start)):
                view = view.narrow(d, lo - base, size)
            self.add(part.offsets, view)

    def snapshot(self) -> "GlobalShards":
        """A copy whose pieces no longer change with the tensors they were views of."""
        copy = GlobalShards(tuple(self.global_shape), self.dtype)
        copy.pieces = {offsets: t.detach().clone() for offsets, t in self.pieces.items()}
        return copy

    # DCP's _Checkpointable protocol -------------------------------------------------------------------------------
    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        properties = TensorProperties(dtype=self.dtype)
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(offsets), t.shape),
                                                      properties=properties, size=self.global_shape))
                for offsets, t in self.pieces.items()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(offsets), t.shape) for offsets, t in self.pieces.items()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.pieces[tuple(index.offset)]
