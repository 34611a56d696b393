"""The only module in megamoe that calls torch.distributed collectives.

Every function takes an AxisGroup, so each call is
  - free when the group has one rank (a local copy or nothing; no torch call, nothing recorded),
  - recorded in the group's CommLedger (calls and bytes per axis and operation) when recording is on,
  - named when it fails: a timeout or a dead peer raises CollectiveError with the group's kind and ranks instead of
    the backend's anonymous message.
Collectives along a dimension other than 0 and the autograd-aware versions live in regions.py, built on these.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from megamoe.parallel.group import AxisGroup

ReduceOp = dist.ReduceOp
# torch 2.13 renamed the flat all-gather / reduce-scatter; older releases only have the first names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CollectiveError(RuntimeError):
    """A collective did not complete: a rank of the group is dead, absent, or stuck elsewhere (or timed out)."""


@contextmanager
def _named_failure(group: AxisGroup, op: str) -> Iterator[None]:
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as err:  # gloo and NCCL raise RuntimeError subclasses (DistBackendError, ...)
        limit = f" within its timeout of {group.timeout}" if group.timeout is not None else ""
        raise CollectiveError(
            f"{op} on {group.describe()} did not complete{limit}: a rank of this group is dead, absent or stuck "
            f"in a different collective. This is rank {group.global_rank(group.index)}. Backend said: {err}"
        ) from err


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Pending:
    """An asynchronous collective; wait() blocks until it is done and names the group if it fails."""

    group: AxisGroup
    op: str
    work: object | None = None

    def wait(self) -> None:
        if self.work is not None:
            with _named_failure(self.group, self.op):
                self.work.wait()
            self.work = None


def _launch(group: AxisGroup, op: str, payload_bytes: int, wire_bytes: int, async_op: bool,
            call: Callable[[], object]) -> Pending | None:
    """Record the call, run it with named failures, and wait for it unless async_op."""
    group.ledger.record(group.axis, op, payload_bytes, wire_bytes)
    # Named in profiler traces as "comm.<op>.<axis>" (inference/profiling.py sums them per MoE layer).
    with torch.profiler.record_function(f"comm.{op}.{group.axis}"), _named_failure(group, op):
        work = call()
        pending = Pending(group, op, work)
        if not async_op:
            pending.wait()
            return None
    return pending


def all_reduce(tensor: torch.Tensor, group: AxisGroup, op=ReduceOp.SUM, async_op: bool = False) -> Pending | None:
    """Reduce `tensor` in place over the group."""
    n = group.size
    if n == 1:
        return Pending(group, "all_reduce") if async_op else None
    s = _nbytes(tensor)
    return _launch(group, "all_reduce", s, 2 * (n - 1) * s // n, async_op,
                   lambda: dist.all_reduce(tensor, op=op, group=group.process_group, async_op=async_op))


def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group: AxisGroup,
                           async_op: bool = False) -> Pending | None:
    """output[i * len(input) : (i+1) * len(input)] = input of member i (concatenation along dim 0)."""
    n = group.size
    if output.numel() != n * input.numel():
        raise ValueError(f"all_gather on {group.describe()}: output has {output.numel()} elements, "
                         f"expected {n} x {input.numel()}")
    if n == 1:
        output.copy_(input.view_as(output))
        return Pending(group, "all_gather") if async_op else None
    s = _nbytes(input)
    return _launch(group, "all_gather", s, (n - 1) * s, async_op,
                   lambda: _all_gather_flat(output, input.contiguous(), group=group.process_group,
                                            async_op=async_op))


def reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor, group: AxisGroup, op=ReduceOp.SUM,
                          async_op: bool = False) -> Pending | None:
    """output = member `index`'s 1/n slice (along dim 0) of the sum of every member's input."""
    n = group.size
    if input.numel() != n * output.numel():
        raise ValueError(f"reduce_scatter on {group.describe()}: input has {input.numel()} elements, "
                         f"expected {n} x {output.numel()}")
    if n == 1:
        output.copy_(input.view_as(output))
        return Pending(group, "reduce_scatter") if async_op else None
    s = _nbytes(input)
    return _launch(group, "reduce_scatter", s, (n - 1) * s // n, async_op,
                   lambda: _reduce_scatter_flat(output, input.contiguous(), op=op, group=group.process_group,
                                                async_op=async_op))


def all_to_all_single(output: torch.Tensor, input: torch.Tensor, group: AxisGroup,
                      output_split_sizes: Sequence[int] | None = None,
                      input_split_sizes: Sequence[int] | None = None) -> None:
    """Member i sends rows input_split_sizes[j] (dim 0) to member j and receives output_split_sizes[j] from j.

    Split sizes of None mean equal splits. Split sizes are host integers: a dropless dispatcher's single host
    sync happens before this call, not inside it.
    """
    n = group.size
    in_splits = list(input_split_sizes) if input_split_sizes is not None else None
    out_splits = list(output_split_sizes) if output_split_sizes is not None else None
    for name, splits, t in (("input", in_splits, input), ("output", out_splits, output)):
        if splits is not None and (len(splits) != n or sum(splits) != t.shape[0]):
            raise ValueError(f"all_to_all on {group.describe()}: {name} splits {splits} must have {n} entries "
                             f"summing to {t.shape[0]} rows")
    if n == 1:
        output.copy_(input)
        return
    s = _nbytes(input)
    row_bytes = s // max(input.shape[0], 1)
    kept = (in_splits[group.index] if in_splits is not None else input.shape[0] // n) * row_bytes
    _launch(group, "all_to_all", s, s - kept, False,
            lambda: dist.all_to_all_single(output, input.contiguous(), out_splits, in_splits,
                                           group=group.process_group))


def broadcast(tensor: torch.Tensor, group: AxisGroup, src_index: int = 0) -> None:
    """Copy member `src_index`'s tensor into every member's `tensor` (in place)."""
    if group.size == 1:
        return
    s = _nbytes(tensor)
    _launch(group, "broadcast", s, s if group.index == src_index else 0, False,
            lambda: dist.broadcast(tensor, src=group.global_rank(src_index), group=group.process_group))


def barrier(group: AxisGroup) -> None:
    """Wait until every member arrives."""
    if group.size == 1:
        return
    _launch(group, "barrier", 0, 0, False, lambda: dist.barrier(group=group.process_group))


def send_recv(group: AxisGroup, sends: Sequence[tuple[torch.Tensor, int]] = (),
              recvs: Sequence[tuple[torch.Tensor, int]] = ()) -> None:
    """Point-to-point: post every send and receive at once (batch_isend_irecv), then wait for all of them.

    Args:
        sends: (tensor, peer index in the group) pairs to send.
        recvs: (buffer, peer index in the group) pairs to fill; shapes are known ahead, never exchanged.
    """
    if not sends and not recvs:
        return
    if group.size == 1:
        raise ValueError(f"send_recv on {group.describe()}: a group of one rank has no peer")
    ops = []
    for tensor, peer in sends:
        group.ledger.record(group.axis, "send", _nbytes(tensor), _nbytes(tensor))
        ops.append(dist.P2POp(dist.isend, tensor.contiguous(), group.global_rank(peer), group.process_group))
    for tensor, peer in recvs:
        group.ledger.record(group.axis, "recv", _nbytes(tensor), 0)
        ops.append(dist.P2POp(dist.irecv, tensor, group.global_rank(peer), group.process_group))
    with _named_failure(group, "send_recv"):
        for work in dist.batch_isend_irecv(ops):
            work.wait()
