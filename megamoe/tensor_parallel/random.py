"""Layout-invariant dropout: each mask element is a hash of (seed, site, the element's global coordinates).

Megatron keeps two RNG streams (a "model-parallel" one seeded per tp rank for sharded regions, the default one for
replicated regions) and checkpoints them around recomputation. Both still make the masks depend on the layout: the
same token at the same position gets a different mask under tp=1 and tp=2 + SP. megamoe instead draws each mask
element from a counter-based hash of its global identity:

    keep[i] = uniform(hash(seed, site, sample id, position, feature or head...)) >= p

so an element replicated on several ranks gets the same mask everywhere (a replicated region), elements held by
different ranks differ as they would in one process (a sharded region), every layout draws exactly the tp=1 masks,
and recomputing a forward reproduces its masks with no RNG state to save or restore. The hash is splitmix64's
finalizer in wrapping int64 arithmetic, so it runs as a few elementwise ops on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

_M64 = (1 << 64) - 1


def _signed(c: int) -> int:
    c &= _M64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; mask off the copied sign bits for a logical shift.
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = z ^ _shift_right(z, 30)
    z = z * _MUL1
    z = z ^ _shift_right(z, 27)
    z = z * _MUL2
    return z ^ _shift_right(z, 31)


def hash_key(*parts: int) -> int:
    """Fold integers (seed, layer, site, ...) into one 64-bit key (as a signed int)."""
    z = torch.tensor(0, dtype=torch.int64)
    for part in parts:
        z = _mix(z + _GOLDEN + _signed(int(part)))
    return int(z)


def hashed_uniform(key: int, coords: Sequence[torch.Tensor]) -> torch.Tensor:
    """Uniform [0, 1) floats of shape (len(coords[0]), len(coords[1]), ...), element i a hash of (key, coords at i).

    coords[d] holds the global index along dim d of each local index (e.g. offset + arange(local size)).
    """
    z = torch.tensor(key, dtype=torch.int64, device=coords[0].device)
    for c in coords:
        z = _mix(z.unsqueeze(-1) * _GOLDEN + c.to(torch.int64))
    # The top 24 bits as a float32 in [0, 1): exact, and the same on every device.
    return _shift_right(z, 40).to(torch.float32) * (1.0 / (1 << 24))


@dataclass(frozen=True)
class DropoutContext:
    """What a dropout site needs to name its elements globally, for one micro-batch.

    Attributes:
        seed: the run's seed.
        sample_ids: [b] global ids of the micro-batch's samples (their index in the training sample stream), so
            data-parallel ranks and successive steps draw different masks.
        seq_offset: global position of this rank's first token when the sequence is split (sequence / context
            parallelism); 0 otherwise.
    """

    seed: int
    sample_ids: torch.Tensor
    seq_offset: int = 0


def dropout(x: torch.Tensor, p: float, training: bool, ctx: DropoutContext | None, site: Sequence[int],
            coords: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dropout of `x` with masks from hashed_uniform(key(seed, *site), coords); identity when p == 0 or eval.

    Args:
        site: integers naming the dropout site (layer number, which dropout in the layer).
        coords: global indices along each dim of x (see hashed_uniform).
    """
    if not training or p == 0.0:
        return x
    if ctx is None:
        raise ValueError("dropout > 0 in training needs a DropoutContext (pass sample_ids to the model)")
    keep = hashed_uniform(hash_key(ctx.seed, *site), coords) >= p
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))
