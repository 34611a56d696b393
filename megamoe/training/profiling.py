"""--profile: a torch.profiler trace of chosen training steps on chosen ranks (Megatron-LM's flags).

Each profiled rank writes {dir}/rank{r}.pt.trace.json (open it in Perfetto, chrome://tracing or TensorBoard's
profiler plugin) and {dir}/rank{r}.summary.txt, a table of the ops that cost the most time.

Input shapes are recorded only with --profile-record-shapes: on CPU, recording them made the loss's 32-row chunks
look 12x slower than they run (softmax 510 against 36-42 ms a step, small benchmark preset; most likely the
profiler's own allocations split the freed blocks that the next chunk would have reused, so it page-faults).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProfileConfig:
    """Profile steps [step_start, step_end] (1-based iterations) on the given global ranks, into output_dir."""

    enabled: bool = False
    step_start: int = 10
    step_end: int = 12
    ranks: tuple[int, ...] = (0,)
    output_dir: str = "profile"
    record_shapes: bool = False

    def check(self, world_size: int) -> None:
        if not self.enabled:
            return
        if not 1 <= self.step_start <= self.step_end:
            raise ValueError(f"--profile-step-start {self.step_start} and --profile-step-end {self.step_end} must "
                             f"satisfy 1 <= start <= end")
        bad = [r for r in self.ranks if not 0 <= r < world_size]
        if bad:
            raise ValueError(f"--profile-ranks {bad} are not ranks of this world of {world_size}")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("profiling")
        g.add_argument("--profile", action="store_true", help="trace steps with torch.profiler")
        g.add_argument("--use-pytorch-profiler", action="store_true", help="accepted; the profiler is torch's")
        g.add_argument("--profile-step-start", type=int, default=10)
        g.add_argument("--profile-step-end", type=int, default=12)
        g.add_argument("--profile-ranks", type=int, nargs="+", default=[0])
        g.add_argument("--profile-dir", default=None, help="default: <tensorboard dir or log dir>/profile")
        g.add_argument("--profile-record-shapes", action="store_true",
                       help="also record each op's input shapes (on CPU this distorts the times of chunked ops)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ProfileConfig":
        base = args.tensorboard_dir or args.log_dir or args.save or "."
        return cls(args.profile, args.profile_step_start, args.profile_step_end, tuple(args.profile_ranks),
                   args.profile_dir or os.path.join(base, "profile"), args.profile_record_shapes)


class StepProfiler:
    """Call begin(iteration) before a training step and end(iteration) after it."""

    def __init__(self, config: ProfileConfig, rank: int) -> None:
        self.config, self.rank = config, rank
        self.active = config.enabled and rank in config.ranks
        self.profiler = None

    def begin(self, iteration: int) -> None:
        if self.active and iteration == self.config.step_start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=self.config.record_shapes)
            self.profiler.__enter__()

    def end(self, iteration: int) -> None:
        if self.profiler is not None and (iteration == self.config.step_end or iteration < 0):
            self.profiler.__exit__(None, None, None)
            os.makedirs(self.config.output_dir, exist_ok=True)
            prefix = os.path.join(self.config.output_dir, f"rank{self.rank}")
            self.profiler.export_chrome_trace(prefix + ".pt.trace.json")
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            with open(prefix + ".summary.txt", "w") as f:
                f.write(self.profiler.key_averages().table(sort_by=sort, row_limit=30))
            print(f"profile of steps {self.config.step_start}-{self.config.step_end} on rank {self.rank}: "
                  f"{prefix}.pt.trace.json", flush=True)
            self.profiler = None

    def close(self) -> None:
        """Finish a trace cut short by an early exit."""
        self.end(-1)
