"""Parameters that know their global tensor, and initialization that depends only on (seed, global name, slice).

Every parameter megamoe creates carries a ParamSpec: the whole tensor's shape, which slice of it this rank holds,
and how the whole tensor is initialized. initialize_parameters() then fills each local shard with exactly the
values the same slice has in a single-process model: the whole tensor is drawn from a generator seeded by
(seed, global name) and sliced. So tp=4 shards are bitwise slices of the tp=1 tensors, no rank ever holds more than
one whole tensor at a time, and no "seed checkpoint" is ever needed (invariant 1 of design/ARCHITECTURE.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamSpec:
    """How a local parameter relates to its global tensor.

    Attributes:
        global_shape: shape of the whole tensor (what a single process holds).
        shard_dim: the dimension split across `shard_count` ranks, or None when replicated.
        shard_index: which piece this rank holds.
        shard_count: into how many pieces shard_dim is split.
        chunks: shard_dim is a concatenation of `chunks` equal blocks, each split separately (SwiGLU's [gate; up]
            fc1: rank r holds [gate_r; up_r]). 1 means one contiguous slice.
        init: "normal" (mean 0, `std`), "zeros" or "ones".
        std: standard deviation for "normal".
        init_key: the global name whose values this parameter takes (a tied output layer on the last pipeline stage
            takes the word embedding's); None means the parameter's own name.
        sequence_parallel: replicated across tp ranks that each see a different sequence shard, so its gradient is
            partial per rank and must be summed over tp (norm weights, row-parallel biases under SP).
        experts: (first, count) when dim 0 lists experts: this rank holds experts [first, first + count) of
            global_shape[0]. Each expert is drawn on its own, from the name "<name>/expert<e>", so a rank draws
            only its own experts and expert e has the same values under every expert-parallel size.
        valid_rows: only the first `valid_rows` rows (dim 0) are drawn; the rest are padding and start at zero.
            The vocabulary is padded to a multiple of 128 x tp (Megatron's rule), so the padded size depends on
            the layout; drawing only the real rows keeps every real row's values layout-independent.
    """

    global_shape: tuple[int, ...]
    shard_dim: int | None = None
    shard_index: int = 0
    shard_count: int = 1
    chunks: int = 1
    init: str = "normal"
    std: float = 0.02
    init_key: str | None = None
    sequence_parallel: bool = False
    experts: tuple[int, int] | None = None
    valid_rows: int | None = None

    def __post_init__(self) -> None:
        if self.init not in ("normal", "zeros", "ones"):
            raise ValueError(f"unknown init {self.init!r}")
        if self.shard_dim is not None and self.global_shape[self.shard_dim] % (self.shard_count * self.chunks):
            raise ValueError(f"dim {self.shard_dim} of {self.global_shape} does not split into "
                             f"{self.chunks} chunks x {self.shard_count} shards")

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.global_shape)
        if self.experts is not None:
            shape[0] = self.experts[1]
        if self.shard_dim is not None:
            shape[self.shard_dim] //= self.shard_count
        return tuple(shape)

    def _own_experts(self, full: torch.Tensor) -> torch.Tensor:
        if self.experts is None:
            return full
        first, count = self.experts
        return full[first:first + count]

    def place_local(self, full: torch.Tensor, local: torch.Tensor) -> None:
        """Write this rank's piece `local` into its place in the whole tensor `full` (the inverse of take_local)."""
        full = self._own_experts(full)
        if self.shard_dim is None:
            full.copy_(local)
            return
        for block, piece in zip(full.chunk(self.chunks, dim=self.shard_dim),
                                local.chunk(self.chunks, dim=self.shard_dim)):
            block.chunk(self.shard_count, dim=self.shard_dim)[self.shard_index].copy_(piece)

    def take_local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the whole tensor `full`."""
        full = self._own_experts(full)
        if self.shard_dim is None:
            return full
        blocks = full.chunk(self.chunks, dim=self.shard_dim)
        return torch.cat([b.chunk(self.shard_count, dim=self.shard_dim)[self.shard_index] for b in blocks],
                         dim=self.shard_dim)


def new_param(spec: ParamSpec, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> nn.Parameter:
    """An uninitialized parameter of spec.local_shape that carries `spec` (filled by initialize_parameters)."""
    param = nn.Parameter(torch.empty(spec.local_shape, device=device, dtype=dtype))
    param.spec = spec
    return param


def name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, global name); stable across runs, machines and Python versions."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def global_init_tensor(spec: ParamSpec, seed: int, name: str) -> torch.Tensor:
    """The whole tensor, in fp32 on the CPU, that a parameter named `name` with `spec` starts from."""
    if spec.init == "zeros":
        return torch.zeros(spec.global_shape)
    if spec.init == "ones":
        return torch.ones(spec.global_shape)
    generator = torch.Generator().manual_seed(name_seed(seed, spec.init_key or name))
    rows = spec.global_shape[0] if spec.valid_rows is None else spec.valid_rows
    drawn = torch.empty((rows,) + spec.global_shape[1:]).normal_(0.0, spec.std, generator=generator)
    padding = torch.zeros((spec.global_shape[0] - rows,) + spec.global_shape[1:])
    return torch.cat([drawn, padding]) if padding.numel() else drawn


def local_init_tensor(spec: ParamSpec, seed: int, name: str) -> torch.Tensor:
    """This rank's initial piece of parameter `name`, drawing at most one whole tensor (one expert's) at a time."""
    if spec.experts is None:
        return spec.take_local(global_init_tensor(spec, seed, name))
    first, count = spec.experts
    one = dataclasses.replace(spec, global_shape=spec.global_shape[1:], experts=None,
                              shard_dim=None if spec.shard_dim is None else spec.shard_dim - 1)
    return torch.stack([one.take_local(global_init_tensor(one, seed, f"{name}/expert{e}"))
                        for e in range(first, first + count)])


@torch.no_grad()
def initialize_parameters(module: nn.Module, seed: int, prefix: str = "") -> None:
    """Fill every parameter of `module` that has a spec from (seed, prefix + its name, its slice)."""
    for name, param in module.named_parameters():
        spec = getattr(param, "spec", None)
        if spec is None:
            raise ValueError(f"parameter {prefix + name} has no ParamSpec; create it with new_param()")
        if param.device.type == "meta":  # a shape-only model (e.g. to list a checkpoint's tensors): no values
            continue
        param.copy_(local_init_tensor(spec, seed, prefix + name).to(param.dtype))
