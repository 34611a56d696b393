"""Learning-rate and weight-decay schedules, as Megatron-LM's OptimizerParamScheduler computes them (by iteration).

    warm-up (step <= warmup):  init + (max - init) * step / warmup
    then, until decay_iters:   min + coeff * (max - min), with decay ratio r = (step - warmup) / (decay - warmup)
        constant     coeff 1 (lr = max)
        linear       1 - r
        cosine       (cos(pi r) + 1) / 2
        inverse-square-root   lr = max(min, max * sqrt(max(warmup, 1)) / sqrt(max(step, 1)))
        WSD          1 until decay - wsd_decay_iters, then by the WSD decay style over wsd_decay_iters:
                     linear 1 - r', cosine (cos(pi r') + 1) / 2, exponential 2 * 0.5^r' - 1, minus_sqrt 1 - sqrt(r')
    after decay_iters:         min
Weight decay goes from start to end over wd_incr_iters: constant, linear (r) or cosine ((cos(pi (1 - r)) + 1) / 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
WD_STYLES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class ScheduleConfig:
    """Megatron-LM's schedule flags (by iterations): --lr, --min-lr, --lr-decay-style, --lr-decay-iters,
    --lr-warmup-iters (or --lr-warmup-fraction of the decay iters), --lr-warmup-init, --lr-wsd-decay-style,
    --lr-wsd-decay-iters, --start-weight-decay, --end-weight-decay, --weight-decay-incr-style, and the
    weight-decay horizon (the run's --train-iters)."""

    lr: float
    decay_iters: int
    min_lr: float = 0.0
    decay_style: str = "linear"
    warmup_iters: int = 0
    warmup_fraction: float | None = None
    warmup_init: float = 0.0
    wsd_decay_style: str = "exponential"
    wsd_decay_iters: int | None = None
    start_weight_decay: float = 0.01
    end_weight_decay: float = 0.01
    weight_decay_incr_style: str = "constant"
    wd_incr_iters: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.decay_style not in DECAY_STYLES:
            problems.append(f"--lr-decay-style must be one of {DECAY_STYLES}, got {self.decay_style!r}")
        if self.decay_iters <= 0:
            problems.append(f"--lr-decay-iters must be > 0 (defaults to --train-iters), got {self.decay_iters}")
        if self.warmup_fraction is not None and self.warmup_iters:
            problems.append("give --lr-warmup-fraction or --lr-warmup-iters, not both")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction <= 1:
            problems.append(f"--lr-warmup-fraction must be in [0, 1], got {self.warmup_fraction}")
        if self.decay_iters > 0 and self.warmup_steps >= self.decay_iters and self.decay_style != "constant":
            problems.append(f"warm-up ({self.warmup_steps} iterations) must be shorter than --lr-decay-iters "
                            f"({self.decay_iters})")
        if self.min_lr > self.lr:
            problems.append(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        if self.decay_style == "WSD":
            if self.wsd_decay_style not in WSD_STYLES:
                problems.append(f"--lr-wsd-decay-style must be one of {WSD_STYLES}")
            if self.wsd_decay_iters is None or not 0 < self.wsd_decay_iters <= self.decay_iters:
                problems.append("--lr-decay-style WSD needs --lr-wsd-decay-iters in (0, --lr-decay-iters]")
        if self.weight_decay_incr_style not in WD_STYLES:
            problems.append(f"--weight-decay-incr-style must be one of {WD_STYLES}")
        elif self.weight_decay_incr_style == "constant" and self.start_weight_decay != self.end_weight_decay:
            problems.append("--weight-decay-incr-style constant needs --start-weight-decay == --end-weight-decay")
        if problems:
            raise ValueError("invalid learning-rate schedule:\n  - " + "\n  - ".join(problems))

    @property
    def warmup_steps(self) -> int:
        if self.warmup_fraction is not None:
            return int(self.warmup_fraction * self.decay_iters)
        return self.warmup_iters


def learning_rate(c: ScheduleConfig, step: int) -> float:
    """The learning rate at iteration `step` (the number of optimizer steps taken so far)."""
    warmup = c.warmup_steps
    if warmup > 0 and step <= warmup:
        return c.warmup_init + (c.lr - c.warmup_init) * step / warmup
    if c.decay_style == "constant":
        return c.lr
    if step > c.decay_iters:
        return c.min_lr
    if c.decay_style == "inverse-square-root":
        return max(c.min_lr, c.lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(step, 1)))
    ratio = (step - warmup) / (c.decay_iters - warmup)
    if c.decay_style == "linear":
        coeff = 1.0 - ratio
    elif c.decay_style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:  # WSD: stable, then decay over the last wsd_decay_iters
        anneal_start = c.decay_iters - c.wsd_decay_iters
        if step <= anneal_start:
            coeff = 1.0
        else:
            r = (step - anneal_start) / c.wsd_decay_iters
            coeff = {"linear": 1.0 - r, "cosine": 0.5 * (math.cos(math.pi * r) + 1.0),
                     "exponential": 2.0 * 0.5 ** r - 1.0, "minus_sqrt": 1.0 - math.sqrt(r)}[c.wsd_decay_style]
    return c.min_lr + coeff * (c.lr - c.min_lr)


def weight_decay(c: ScheduleConfig, step: int) -> float:
    """The weight decay at iteration `step`."""
    horizon = c.wd_incr_iters or c.decay_iters
    if step > horizon or c.weight_decay_incr_style == "constant":
        return c.end_weight_decay
    ratio = step / horizon
    coeff = ratio if c.weight_decay_incr_style == "linear" else 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)
    return c.start_weight_decay + coeff * (c.end_weight_decay - c.start_weight_decay)


def add_schedule_arguments(parser) -> None:
    g = parser.add_argument_group("learning rate", "Megatron-LM's schedule flags (iteration-based)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="linear", choices=DECAY_STYLES)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-wsd-decay-style", default="exponential", choices=WSD_STYLES)
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--start-weight-decay", type=float, default=None)
    g.add_argument("--end-weight-decay", type=float, default=None)
    g.add_argument("--weight-decay-incr-style", default="constant", choices=WD_STYLES)


def schedule_config_from_args(args, train_iters: int) -> ScheduleConfig:
    start = args.start_weight_decay if args.start_weight_decay is not None else args.weight_decay
    end = args.end_weight_decay if args.end_weight_decay is not None else args.weight_decay
    return ScheduleConfig(lr=args.lr, decay_iters=args.lr_decay_iters or train_iters, min_lr=args.min_lr,
                          decay_style=args.lr_decay_style, warmup_iters=args.lr_warmup_iters,
                          warmup_fraction=args.lr_warmup_fraction, warmup_init=args.lr_warmup_init,
                          wsd_decay_style=args.lr_wsd_decay_style, wsd_decay_iters=args.lr_wsd_decay_iters,
                          start_weight_decay=start, end_weight_decay=end,
                          weight_decay_incr_style=args.weight_decay_incr_style, wd_incr_iters=train_iters)
