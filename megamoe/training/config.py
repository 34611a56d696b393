"""TrainingConfig: batch sizes, iterations, logging and exit conditions (Megatron-LM's flags), and the parser that
gathers every subsystem's flags into one --help grouped by subsystem."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megamoe.data.builder import DataConfig
from megamoe.data.tokenizers import add_tokenizer_arguments
from megamoe.distributed.data_parallel import add_ddp_arguments
from megamoe.model.config import ModelConfig
from megamoe.moe.config import MoEConfig
from megamoe.optim.lr_scheduler import add_schedule_arguments
from megamoe.optim.optimizer import add_optimizer_arguments
from megamoe.parallel.config import ParallelConfig
from megamoe.pipeline.stages import add_pipeline_arguments


@dataclass(frozen=True)
class TrainingConfig:
    """Attributes (Megatron-LM flag names): micro_batch_size, global_batch_size, train_iters (or train_samples),
    seed, log_interval, eval_interval, eval_iters, exit_interval, exit_duration_in_mins, exit_signal_handler,
    calculate_per_token_loss, log_dir (the JSONL metrics file goes there), tensorboard_dir, wandb_project,
    wandb_exp_name."""

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
    log_dir: str | None = None
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_exp_name: str | None = None

    def check(self, dp: int) -> None:
        """Raise (on every rank, before any collective) when the batch sizes do not fit the layout."""
        problems = []
        for name in ("micro_batch_size", "global_batch_size", "train_iters", "log_interval", "eval_interval"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        if not problems and self.global_batch_size % (self.micro_batch_size * dp):
            problems.append(f"--global-batch-size {self.global_batch_size} is not divisible by --micro-batch-size "
                            f"{self.micro_batch_size} x data-parallel size {dp}; change one of them")
        if problems:
            raise ValueError("invalid training config:\n  - " + "\n  - ".join(problems))

    def num_microbatches(self, dp: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * dp)

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
        g.add_argument("--log-dir", default=None, help="where metrics.jsonl is written")
        g.add_argument("--tensorboard-dir", default=None)
        g.add_argument("--wandb-project", default=None)
        g.add_argument("--wandb-exp-name", default=None)
        g.add_argument("--log-throughput", action="store_true", help="accepted; throughput is always logged")
        g.add_argument("--deterministic-mode", action="store_true", help="accepted; CPU runs are deterministic")
        g.add_argument("--save", default=None, help="checkpoints: not available yet")
        g.add_argument("--load", default=None, help="checkpoints: not available yet")
        g.add_argument("--save-interval", type=int, default=None)
        g.add_argument("--no-load-optim", action="store_true")
        g.add_argument("--no-load-rng", action="store_true")

    @classmethod
    def from_args(cls, args: argparse.Namespace, dp: int) -> "TrainingConfig":
        gbs = args.global_batch_size or args.micro_batch_size * dp
        if (args.train_iters is None) == (args.train_samples is None):
            raise ValueError("give exactly one of --train-iters and --train-samples")
        iters = args.train_iters if args.train_iters is not None else -(-args.train_samples // gbs)
        return cls(args.micro_batch_size, gbs, iters, args.seed, args.log_interval, args.eval_interval,
                   args.eval_iters, args.exit_interval, args.exit_duration_in_mins, args.exit_signal_handler,
                   args.calculate_per_token_loss, args.log_dir, args.tensorboard_dir, args.wandb_project,
                   args.wandb_exp_name)


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
    add_optimizer_arguments(parser)
    add_schedule_arguments(parser)
    add_ddp_arguments(parser)
    return parser
