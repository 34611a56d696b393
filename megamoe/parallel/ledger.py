"""CommLedger: counts collective calls and bytes per (process-group axis, operation).

comm.py records every call it makes on a group larger than one rank while the ledger is enabled. Tests compare the
ledger with closed-form predictions of a step's traffic; benchmarks print it as bytes moved.

Two byte counts per call, both for this rank only:
    bytes       the payload this rank hands to the operation: its input buffer (for recv: the buffer it fills).
    wire_bytes  what leaves this rank under the bandwidth-optimal algorithm, rounded down, with n the group size
                and S the payload:
                    all_reduce          2 (n-1)/n S    (ring: reduce-scatter then all-gather)
                    all_gather          (n-1) S        (S is this rank's shard)
                    reduce_scatter      (n-1)/n S      (S is the full input)
                    all_to_all          S minus the part this rank keeps
                    broadcast           S on the source, 0 elsewhere (a lower bound; trees forward more)
                    send / recv         S / 0
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


@dataclass
class LedgerEntry:
    """Totals for one (axis, operation)."""

    calls: int = 0
    bytes: int = 0
    wire_bytes: int = 0


class CommLedger:
    """Per-(axis, op) totals of collective calls on this rank. Off until enabled; cheap when off."""

    def __init__(self) -> None:
        self.enabled = False
        self._entries: dict[tuple[str, str], LedgerEntry] = {}

    def record(self, axis: str, op: str, payload_bytes: int, wire_bytes: int) -> None:
        if not self.enabled:
            return
        entry = self._entries.setdefault((axis, op), LedgerEntry())
        entry.calls += 1
        entry.bytes += payload_bytes
        entry.wire_bytes += wire_bytes

    @contextmanager
    def recording(self) -> Iterator["CommLedger"]:
        """Enable recording inside the block (restores the previous state after)."""
        previous, self.enabled = self.enabled, True
        try:
            yield self
        finally:
            self.enabled = previous

    def reset(self) -> None:
        self._entries.clear()

    def entries(self) -> dict[tuple[str, str], LedgerEntry]:
        """A copy of the totals, keyed by (axis, op)."""
        return {k: LedgerEntry(v.calls, v.bytes, v.wire_bytes) for k, v in self._entries.items()}

    def total(self, axis: str | None = None, op: str | None = None) -> LedgerEntry:
        """Sum over the entries matching `axis` and `op` (None matches any)."""
        out = LedgerEntry()
        for (a, o), e in self._entries.items():
            if (axis is None or a == axis) and (op is None or o == op):
                out.calls += e.calls
                out.bytes += e.bytes
                out.wire_bytes += e.wire_bytes
        return out

    def format_table(self) -> str:
        """A human-readable table, one row per (axis, op)."""
        rows = [("axis", "op", "calls", "bytes", "wire bytes")]
        rows += [(a, o, str(e.calls), str(e.bytes), str(e.wire_bytes)) for (a, o), e in sorted(self._entries.items())]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                         for r in rows)
