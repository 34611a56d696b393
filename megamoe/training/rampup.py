"""Batch-size ramp-up (Megatron-LM's --rampup-batch-size <start> <increment> <ramp-up samples>).

The global batch starts at `start` and grows by `increment` each time another ramp-up samples / number of
increments samples have been consumed, until it reaches --global-batch-size. The number of micro-batches per step
follows it; the micro-batch size and the samples each data-parallel rank reads per micro-batch stay fixed, so the
data order is the same as without ramp-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchSizeRampup:
    """start, increment: global batch sizes; samples: consumed samples over which the batch ramps up."""

    start: int
    increment: int
    samples: int

    def problems(self, global_batch_size: int, micro_batch_times_dp: int) -> list[str]:
        out = []
        if self.start < 1 or self.increment < 1 or self.samples < 0:
            return ["--rampup-batch-size needs <start> >= 1, <increment> >= 1 and <samples> >= 0"]
        if self.start > global_batch_size or (global_batch_size - self.start) % self.increment:
            out.append(f"--rampup-batch-size: --global-batch-size {global_batch_size} minus the start {self.start} "
                       f"must be a non-negative multiple of the increment {self.increment}")
        for name, value in (("start", self.start), ("increment", self.increment)):
            if value % micro_batch_times_dp:
                out.append(f"--rampup-batch-size: the {name} {value} is not divisible by --micro-batch-size x "
                           f"data-parallel size = {micro_batch_times_dp}")
        return out

    def global_batch_size(self, consumed_samples: int, final: int) -> int:
        """The global batch of the step that starts after consumed_samples."""
        increments = (final - self.start) // self.increment
        if increments == 0 or consumed_samples > self.samples:
            return final
        samples_per_increment = self.samples / increments
        return min(final, self.start + int(consumed_samples / samples_per_increment) * self.increment)

    def iterations(self, train_samples: int, final: int) -> int:
        """Steps needed to consume train_samples: the ramp-up steps, then full batches."""
        consumed = steps = 0
        while consumed < train_samples and consumed <= self.samples:
            consumed += self.global_batch_size(consumed, final)
            steps += 1
        return steps + max(0, math.ceil((train_samples - consumed) / final))
