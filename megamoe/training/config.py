"""TrainingConfig: batch sizes, iterations, logging and exit conditions (Megatron-LM's flags), and the parser that
gathers every subsystem's flags into one --help grouped by subsystem."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megamoe.checkpoint.checkpointer import CheckpointConfig
from megamoe.data.builder import DataConfig
from megamoe.data.tokenizers import add_tokenizer_arguments
from megamoe.distributed.data_parallel import add_ddp_arguments
from megamoe.model.config import ModelConfig
from megamoe.moe.config import MoEConfig
from megamoe.optim.lr_scheduler import add_schedule_arguments
from megamoe.optim.optimizer import add_optimizer_arguments
from megamoe.parallel.config import ParallelConfig
from megamoe.pipeline.stages import add_pipeline_arguments
from megamoe.training.profiling import ProfileConfig
from megamoe.training.rampup import BatchSizeRampup
from megamoe.training.writers import LoggingConfig


@dataclass(frozen=True)
class TrainingConfig:
    """Attributes (Megatron-LM flag names): micro_batch_size, global_batch_size (the final one under ramp-up),
    train_iters (derived from --train-samples when that is given), seed, log_interval, eval_interval, eval_iters,
    exit_interval, exit_duration_in_mins, exit_signal_handler, calculate_per_token_loss, rampup_batch_size."""

    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    seed: int = 1234
    log_interval: int = 100
    eval_interval: int = 1000
    eval_iters: int = 100
    exit_interval: int | None = None
    exit_duration_in_mins: float | None = None
    exit_signal_handler: bool = False
    calculate_per_token_loss: bool = False
    rampup_batch_size: BatchSizeRampup | None = None

    def check(self, dp: int) -> None:
        """Raise (on every rank, before any collective) when the batch sizes do not fit the layout."""
        problems = []
        for name in ("micro_batch_size", "global_batch_size", "train_iters", "log_interval", "eval_interval"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        if not problems and self.global_batch_size % (self.micro_batch_size * dp):
            problems.append(f"--global-batch-size {self.global_batch_size} is not divisible by --micro-batch-size "
                            f"{self.micro_batch_size} x data-parallel size {dp}; change one of them")
        if not problems and self.rampup_batch_size is not None:
            problems += self.rampup_batch_size.problems(self.global_batch_size, self.micro_batch_size * dp)
        if problems:
            raise ValueError("invalid training config:\n  - " + "\n  - ".join(problems))

    def batch_size(self, consumed_samples: int) -> int:
        """The global batch of the step after consumed_samples (--global-batch-size unless ramping up)."""
        if self.rampup_batch_size is None:
            return self.global_batch_size
        return self.rampup_batch_size.global_batch_size(consumed_samples, self.global_batch_size)

    def num_microbatches(self, dp: int, consumed_samples: int = 0) -> int:
        return self.batch_size(consumed_samples) // (self.micro_batch_size * dp)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("training", "Megatron-LM's training and logging flags")
        g.add_argument("--micro-batch-size", type=int, required=True)
        g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x dp")
        g.add_argument("--train-iters", type=int, default=None)
        g.add_argument("--train-samples", type=int, default=None, help="instead of --train-iters")
        g.add_argument("--seed", type=int, default=1234)
        g.add_argument("--log-interval", type=int, default=100)
        g.add_argument("--eval-interval", type=int, default=1000)
        g.add_argument("--eval-iters", type=int, default=100)
        g.add_argument("--exit-interval", type=int, default=None)
        g.add_argument("--exit-duration-in-mins", type=float, default=None)
        g.add_argument("--exit-signal-handler", action="store_true")
        g.add_argument("--calculate-per-token-loss", action="store_true")
        g.add_argument("--rampup-batch-size", nargs=3, type=int, default=None,
                       metavar=("START", "INCREMENT", "SAMPLES"),
                       help="grow the global batch from START by INCREMENT over SAMPLES consumed samples")
        g.add_argument("--deterministic-mode", action="store_true", help="accepted; CPU runs are deterministic")

    @classmethod
    def from_args(cls, args: argparse.Namespace, dp: int) -> "TrainingConfig":
        gbs = args.global_batch_size or args.micro_batch_size * dp
        if (args.train_iters is None) == (args.train_samples is None):
            raise ValueError("give exactly one of --train-iters and --train-samples")
        rampup = BatchSizeRampup(*args.rampup_batch_size) if args.rampup_batch_size else None
        if args.train_iters is not None:
            iters = args.train_iters
        elif rampup is not None and not rampup.problems(gbs, args.micro_batch_size * dp):
            iters = rampup.iterations(args.train_samples, gbs)
        else:
            iters = -(-args.train_samples // gbs)
        return cls(args.micro_batch_size, gbs, iters, args.seed, args.log_interval, args.eval_interval,
                   args.eval_iters, args.exit_interval, args.exit_duration_in_mins, args.exit_signal_handler,
                   args.calculate_per_token_loss, rampup)


def build_parser() -> argparse.ArgumentParser:
    """Every flag, grouped by the subsystem that owns it."""
    parser = argparse.ArgumentParser(prog="pretrain_gpt.py", description="Pretrain a (Mixture-of-Experts) GPT model.",
                                     allow_abbrev=False)
    ParallelConfig.add_arguments(parser)
    add_pipeline_arguments(parser)
    ModelConfig.add_arguments(parser)
    MoEConfig.add_arguments(parser)
    add_tokenizer_arguments(parser)
    DataConfig.add_arguments(parser)
    TrainingConfig.add_arguments(parser)
    CheckpointConfig.add_arguments(parser)
    LoggingConfig.add_arguments(parser)
    ProfileConfig.add_arguments(parser)
    add_optimizer_arguments(parser)
    add_schedule_arguments(parser)
    add_ddp_arguments(parser)
    return parser
