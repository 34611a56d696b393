"""Where logged figures go: one JSON object per logged iteration in metrics.jsonl, TensorBoard scalars
(--tensorboard-dir) and Weights & Biases (--wandb-project; offline unless WANDB_API_KEY is set).

Only the logging rank (the last one, which holds the loss) writes. TensorBoard and wandb are optional packages
(the `logging` extra): asking for one that is not installed is an error before training starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LoggingConfig:
    """log_dir: where metrics.jsonl goes (default: the --save directory, else nowhere); tensorboard_dir;
    wandb_project, wandb_exp_name, wandb_save_dir (Megatron-LM's flags)."""

    log_dir: str | None = None
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None

    def check(self) -> None:
        """Raise (before any collective) when a requested writer's package is missing."""
        for wanted, package, flag in ((self.tensorboard_dir, "tensorboard", "--tensorboard-dir"),
                                      (self.wandb_project, "wandb", "--wandb-project")):
            if wanted and importlib.util.find_spec(package) is None:
                raise ValueError(f"{flag} needs the {package} package: pip install {package} (or megamoe[logging])")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("logging", "metrics.jsonl, TensorBoard and wandb")
        g.add_argument("--log-dir", default=None, help="where metrics.jsonl is written (default: the --save dir)")
        g.add_argument("--tensorboard-dir", default=None)
        g.add_argument("--wandb-project", default=None)
        g.add_argument("--wandb-exp-name", default=None)
        g.add_argument("--wandb-save-dir", default=None, help="default: <save or log dir>/wandb")
        g.add_argument("--log-throughput", action="store_true", help="accepted; throughput is always logged")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LoggingConfig":
        return cls(args.log_dir or args.save, args.tensorboard_dir, args.wandb_project, args.wandb_exp_name,
                   args.wandb_save_dir)


class MetricsWriter:
    """Writes logged figures to every configured destination. A no-op on ranks other than the logging one."""

    def __init__(self, config: LoggingConfig, run_config: dict, active: bool) -> None:
        self.jsonl = self.tensorboard = self.wandb = None
        if not active:
            return
        if config.log_dir:
            os.makedirs(config.log_dir, exist_ok=True)
            self.jsonl = open(os.path.join(config.log_dir, "metrics.jsonl"), "a")
        if config.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(config.tensorboard_dir, max_queue=100)
            self.tensorboard.add_text("config", json.dumps(run_config, indent=1, default=str), 0)
        if config.wandb_project:
            import wandb

            save_dir = config.wandb_save_dir or os.path.join(config.log_dir or config.tensorboard_dir or ".", "wandb")
            os.makedirs(save_dir, exist_ok=True)
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.wandb = wandb.init(project=config.wandb_project, name=config.wandb_exp_name, dir=save_dir,
                                    config=run_config, mode=mode)

    def log(self, split: str, iteration: int, scalars: dict[str, float], moe: dict[int, dict] | None = None) -> None:
        """One logged iteration of a split ("train", "valid", "test"): named scalars and per-layer MoE metrics
        ({layer number: reduce_metrics() values})."""
        if self.jsonl is not None:
            record = {"split": split, "iteration": iteration, **scalars}
            if moe:
                record["moe"] = {str(layer): values for layer, values in moe.items()}
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        flat = {(name if split == "train" else f"{name} {split}"): value for name, value in scalars.items()
                if value is not None}
        for layer, values in (moe or {}).items():
            for key, value in values.items():
                if isinstance(value, list):  # one scalar per expert
                    flat.update({f"moe/layer{layer}/{key}/expert{e}": v for e, v in enumerate(value)})
                else:
                    flat[f"moe/layer{layer}/{key}"] = value
        if self.tensorboard is not None:
            for name, value in flat.items():
                self.tensorboard.add_scalar(name, value, iteration)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(flat, step=iteration)

    def close(self) -> None:
        for handle in (self.jsonl, self.tensorboard, self.wandb):
            if handle is not None:
                (handle.finish if handle is self.wandb else handle.close)()
