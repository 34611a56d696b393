"""AxisGroup: one process group as seen from this rank, the handle every comm.py call takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from megamoe.parallel.ledger import CommLedger


@dataclass(frozen=True)
class AxisGroup:
    """The group of kind `axis` ("tp", "dp", "ep", ...) that holds this rank.

    A group of one rank has no torch process group at all: comm.py turns its collectives into local copies, so a
    dimension of size 1 costs nothing.

    Attributes:
        axis: the group kind; names the group in the ledger and in error messages.
        ranks: global ranks of the group, in group order (Megatron-Core's order).
        index: this rank's position in `ranks`.
        process_group: the torch group (None when the group has one rank).
        cpu_process_group: a gloo group over the same ranks for CPU-side metadata; the same object as
            process_group when the backend is already gloo, None when no twin was made.
        ledger: where comm.py records this group's traffic.
        timeout: how long a collective on this group may take before it fails.
    """

    axis: str
    ranks: tuple[int, ...]
    index: int
    process_group: dist.ProcessGroup | None = None
    cpu_process_group: dist.ProcessGroup | None = None
    ledger: CommLedger = field(default_factory=CommLedger, compare=False)
    timeout: timedelta | None = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    def global_rank(self, index: int) -> int:
        """The global rank of member `index` of this group."""
        return self.ranks[index]

    def describe(self) -> str:
        return f"group '{self.axis}' (ranks {list(self.ranks)})"

    @classmethod
    def world(cls, ledger: CommLedger | None = None, timeout: timedelta | None = None) -> "AxisGroup":
        """The whole world of an initialized torch.distributed as an AxisGroup named 'world'."""
        size, rank = dist.get_world_size(), dist.get_rank()
        pg = dist.group.WORLD if size > 1 else None
        gloo = pg if pg is not None and dist.get_backend() == "gloo" else None
        return cls("world", tuple(range(size)), rank, pg, gloo, ledger or CommLedger(), timeout)
