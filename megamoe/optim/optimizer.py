"""The optimizer: fp32 main parameters, AdamW or SGD, replicated or sharded (ZeRO-1), loss scaling, clipping.

It works on the flat buffers of DistributedDataParallel (data_parallel.py). Each buffer is one *region* per rank:
the whole buffer when the optimizer is replicated, or this rank's shard of every bucket with
--use-distributed-optimizer. A region keeps
    main    fp32 master values (a view of the parameter buffer for fp32 models, a copy for bf16/fp16),
    state   AdamW's exp_avg and exp_avg_sq, or SGD's momentum, as flat fp32 tensors,
    spans   [start, end) ranges of the region: decayed ones (not biases and norms: 1-D parameters) and the ones
            "counted here" for the gradient norm.
A step: (fp16) unscale and skip the step if any gradient is inf/NaN anywhere; global gradient norm; clip; update
main values; write them into the parameters; (sharded) all-gather every bucket's updated parameters.

The gradient norm counts every gradient element exactly once over all ranks: tensor-parallel shards add up,
parameters replicated over tp count on tp rank 0, a tied output layer on the last stage is not counted (its
embedding is), and data-parallel replicas count once (or each its own shard when sharded).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from megamoe.distributed.data_parallel import Bucket, DistributedDataParallel, GradBuffer
from megamoe.optim.grad_scaler import DynamicLossScaler
from megamoe.optim.lr_scheduler import ScheduleConfig, learning_rate, weight_decay
from megamoe.parallel import comm
from megamoe.parallel.mesh import ParallelMesh

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class OptimizerConfig:
    """Megatron-LM's flags: --optimizer, --adam-beta1/2, --adam-eps, --sgd-momentum, --clip-grad, --bf16, --fp16,
    --initial-loss-scale, --min-loss-scale, --loss-scale-window, --hysteresis, --loss-scale (static),
    --use-distributed-optimizer. Learning rate and weight decay come from the schedule."""

    optimizer: str = "adam"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    clip_grad: float = 1.0
    bf16: bool = False
    fp16: bool = False
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2
    loss_scale: float | None = None
    use_distributed_optimizer: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.fp16 and self.bf16:
            problems.append("--fp16 and --bf16 exclude each other; pick one")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"--optimizer must be one of {OPTIMIZERS} (the ones --use-distributed-optimizer can "
                            f"shard), got {self.optimizer!r}")
        if self.clip_grad < 0:
            problems.append(f"--clip-grad must be >= 0 (0 disables clipping), got {self.clip_grad}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            problems.append("--adam-beta1 and --adam-beta2 must be in [0, 1)")
        if self.fp16 and (self.min_loss_scale <= 0 or self.initial_loss_scale < self.min_loss_scale):
            problems.append("--initial-loss-scale must be >= --min-loss-scale > 0")
        if self.hysteresis < 1 or self.loss_scale_window < 1:
            problems.append("--hysteresis and --loss-scale-window must be >= 1")
        if problems:
            raise ValueError("invalid optimizer config:\n  - " + "\n  - ".join(problems))


def add_optimizer_arguments(parser) -> None:
    g = parser.add_argument_group("optimizer", "Megatron-LM's optimizer and mixed-precision flags")
    g.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--loss-scale", type=float, default=None)
    g.add_argument("--use-distributed-optimizer", action="store_true")


def optimizer_config_from_args(args) -> OptimizerConfig:
    return OptimizerConfig(args.optimizer, args.adam_beta1, args.adam_beta2, args.adam_eps, args.sgd_momentum,
                           args.clip_grad, args.bf16, args.fp16, args.initial_loss_scale, args.min_loss_scale,
                           args.loss_scale_window, args.hysteresis, args.loss_scale, args.use_distributed_optimizer)


@dataclass
class _Region:
    buffer: GradBuffer
    lo: int
    hi: int
    main: torch.Tensor
    state: list[torch.Tensor]
    decayed: list[tuple[int, int]]
    undecayed: list[tuple[int, int]]
    counted: list[tuple[int, int]]
    bucket: Bucket | None = None  # sharded: the bucket whose parameters are all-gathered after the update
    _views: list | None = field(default=None, repr=False)

    @property
    def grad(self) -> torch.Tensor:
        return self.buffer.grad[self.lo:self.hi]

    def adam_views(self) -> list[tuple[list[list[torch.Tensor]], bool]]:
        """Per span kind (decayed, undecayed): views of [main, grad, exp_avg, exp_avg_sq] over its spans. The
        buffers live as long as the region, so the views are made once."""
        if self._views is None:
            tensors = (self.main, self.grad, *self.state)
            self._views = [([[t[a:b] for a, b in spans] for t in tensors], decay)
                           for spans, decay in ((self.decayed, True), (self.undecayed, False)) if spans]
        return self._views


def _spans(buffer: GradBuffer, lo: int, hi: int, mesh: ParallelMesh, replicated: bool, tied_copy: set):
    """The region [lo, hi)'s (decayed, undecayed, counted) spans, region-relative, adjacent ones merged."""
    tp0 = mesh.coordinates["tp"] == 0
    spans = {"decayed": [], "undecayed": [], "counted": []}

    def add(kind, a, b):
        if spans[kind] and spans[kind][-1][1] == a:
            spans[kind][-1] = (spans[kind][-1][0], b)
        else:
            spans[kind].append((a, b))

    for p, off in sorted(buffer.offsets.items(), key=lambda item: item[1]):
        a, b = max(lo, off) - lo, min(hi, off + p.numel()) - lo
        if a >= b:
            continue
        add("decayed" if p.dim() > 1 else "undecayed", a, b)
        replicated_over_tp = p.spec.shard_dim is None and p.spec.experts is None
        count = (tp0 or not replicated_over_tp) and id(p) not in tied_copy
        if replicated:  # a data-parallel replica of the same values: count on the group's first rank only
            count = count and buffer.group.index == 0
        if count:
            add("counted", a, b)
    return spans["decayed"], spans["undecayed"], spans["counted"]


def _sum_of_squares(t: torch.Tensor, width: int = 4096) -> torch.Tensor:
    """sum(t^2) of a 1-D fp32 tensor, in float64, accurate to ~1e-9 relative: fp32 norms of 4096-element rows
    (a long fp32 accumulation loses ~1e-4), then the rows summed in float64. One pass over t."""
    rows = t.numel() // width * width
    total = torch.linalg.vector_norm(t[:rows].view(-1, width), dim=1, dtype=torch.float32).double().square().sum()
    return total + t[rows:].double().square().sum()


class MegatronOptimizer:
    """AdamW or SGD over DistributedDataParallel buffers (see the module docstring).

    Args:
        ddps: one per model chunk of this rank.
        mesh: the layout.
        config: optimizer options.
        schedule: learning rate and weight decay per iteration.
    """

    def __init__(self, ddps: list[DistributedDataParallel], mesh: ParallelMesh, config: OptimizerConfig,
                 schedule: ScheduleConfig) -> None:
        sharded = config.use_distributed_optimizer
        if any(d.config.use_distributed_optimizer != sharded for d in ddps):
            raise ValueError("--use-distributed-optimizer must be set for both the gradient buffers and the optimizer")
        self.mesh, self.config, self.schedule = mesh, config, schedule
        self.iteration, self.skipped_iterations = 0, 0
        self.scaler = DynamicLossScaler(config) if config.fp16 else None
        self.overlap_param_gather = any(d.config.overlap_param_gather for d in ddps)
        self.regions: list[_Region] = []
        self._names = {id(p): n for d in ddps for n, p in d.module.named_parameters()}
        for ddp in ddps:
            tied_copy = {id(p) for n, p in ddp.module.named_parameters()
                         if n == "output_layer.weight" and getattr(p, "late_reduction", False)}
            for buffer in ddp.buffers:
                spans = ([(b.shard(buffer.group), b) for b in buffer.buckets] if sharded
                         else [((0, buffer.grad.numel()), None)])
                for (lo, hi), bucket in spans:
                    param = buffer.param[lo:hi]
                    main = param if param.dtype == torch.float32 else param.detach().float().clone()
                    slots = 2 if config.optimizer == "adam" else 1
                    state = [torch.zeros_like(main, dtype=torch.float32) for _ in range(slots)]
                    spans = _spans(buffer, lo, hi, mesh, not sharded, tied_copy)
                    self.regions.append(_Region(buffer, lo, hi, main, state, *spans, bucket))

    @property
    def loss_scale(self) -> float:
        """Multiply the loss by this before backward (1 unless --fp16)."""
        return self.scaler.scale if self.scaler is not None else 1.0

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank: moments, plus fp32 main copies for bf16/fp16 models."""
        total = 0
        for r in self.regions:
            total += sum(s.numel() * s.element_size() for s in r.state)
            if r.main.data_ptr() != r.buffer.param[r.lo:r.hi].data_ptr():
                total += r.main.numel() * r.main.element_size()
        return total

    def grad_norm(self) -> float:
        """The global L2 norm of the gradients, every element counted once over all ranks."""
        local = torch.zeros(1, dtype=torch.float64, device=self.mesh.device)
        for r in self.regions:
            grad = r.grad
            for a, b in r.counted:
                local += _sum_of_squares(grad[a:b])
        comm.all_reduce(local, self.mesh.world)
        return math.sqrt(local.item())

    @torch.no_grad()
    def step(self) -> tuple[bool, float | None]:
        """One update. Returns (applied, grad norm); with --fp16 an inf/NaN gradient skips the update."""
        if self.scaler is not None:
            inverse = 1.0 / self.scaler.scale
            found = torch.zeros(1, device=self.mesh.device)
            for r in self.regions:
                r.grad.mul_(inverse)
                found = torch.maximum(found, (~torch.isfinite(r.grad)).any().float().reshape(1))
            comm.all_reduce(found, self.mesh.world, op=comm.ReduceOp.MAX)
            overflow = bool(found.item())
            self.scaler.update(overflow)
            if overflow:
                self.skipped_iterations += 1
                return False, None
        norm = self.grad_norm()
        clip = min(1.0, self.config.clip_grad / (norm + 1e-6)) if self.config.clip_grad > 0 else 1.0
        self.iteration += 1
        lr = learning_rate(self.schedule, self.iteration - 1)
        wd = weight_decay(self.schedule, self.iteration - 1)
        for r in self.regions:
            (self._adam if self.config.optimizer == "adam" else self._sgd)(r, lr, wd, clip)
            if r.main.data_ptr() != r.buffer.param[r.lo:r.hi].data_ptr():
                r.buffer.param[r.lo:r.hi].copy_(r.main)
            if r.bucket is not None:
                b = r.bucket
                pending = comm.all_gather_into_tensor(r.buffer.param[b.start:b.end], r.buffer.param[r.lo:r.hi].clone(),
                                                      r.buffer.group, async_op=True)
                if self.overlap_param_gather:
                    b.param_gather = pending  # waited for by the forward pre-hooks of the modules using it
                else:
                    pending.wait()
        return True, norm

    def _adam(self, r: _Region, lr: float, wd: float, clip: float) -> None:
        # What torch.optim.AdamW does element for element (decoupled weight decay, bias-corrected moments), in
        # torch's fused kernel: one pass over the region instead of a chain of whole-buffer operations. Clipping
        # rides along as the kernel's gradient divisor (made for AMP's unscaling), saving a pass over the buffer.
        c, step = self.config, torch.tensor(float(self.iteration))
        divisor = torch.tensor(1.0 / clip, device=r.grad.device) if clip < 1.0 else None
        for views, decay in r.adam_views():
            torch._fused_adamw_(*views, [], [step] * len(views[0]), lr=lr, beta1=c.adam_beta1, beta2=c.adam_beta2,
                                weight_decay=wd if decay else 0.0, eps=c.adam_eps, amsgrad=False, maximize=False,
                                grad_scale=divisor)

    def _sgd(self, r: _Region, lr: float, wd: float, clip: float) -> None:
        # torch.optim.SGD: coupled weight decay, momentum buffer starting at the first gradient.
        g = r.grad.mul(clip) if clip < 1.0 else r.grad.clone()
        for a, b in r.decayed:
            g[a:b].add_(r.main[a:b], alpha=wd)
        (buf,) = r.state
        if self.iteration == 1:
            buf.copy_(g)
        else:
            buf.mul_(self.config.sgd_momentum).add_(g)
        r.main.add_(buf if self.config.sgd_momentum else g, alpha=-lr)

    # State dicts -------------------------------------------------------------------------------------------------
    @property
    def state_names(self) -> tuple[str, ...]:
        """Names of the per-element state tensors, in region.state order."""
        return ("exp_avg", "exp_avg_sq") if self.config.optimizer == "adam" else ("momentum",)

    @property
    def main_is_param(self) -> bool:
        """The fp32 main values are the parameters themselves (fp32 models), not a separate copy."""
        return all(r.main.data_ptr() == r.buffer.param[r.lo:r.hi].data_ptr() for r in self.regions)

    def pieces(self):
        """Per parameter that this rank's regions cover: (global name, parameter, (start, end) of the covered range
        of the flattened local parameter, main values, [state tensors]). The tensors are views of the optimizer's
        flat buffers over that range: writing them changes the optimizer."""
        for r in self.regions:
            for p, off in r.buffer.offsets.items():
                a, b = max(r.lo, off), min(r.hi, off + p.numel())
                if a < b:
                    yield (self._names[id(p)], p, (a - off, b - off), r.main[a - r.lo:b - r.lo],
                           [t[a - r.lo:b - r.lo] for t in r.state])

    def state_dict(self) -> dict:
        """Counters, loss scaler, and per parameter (by global name) this rank's piece of its optimizer state.

        Each piece says what it covers: the parameter's ParamSpec (global shape, tp/etp shard, experts) and the
        [start, end) range of the flattened local shard (megamoe.checkpoint places it in the global tensor).
        """
        pieces = {name: {"spec": dataclasses.asdict(p.spec), "flat": flat, "main": main.clone(),
                         "state": [t.clone() for t in state]}
                  for name, p, flat, main, state in self.pieces()}
        return {**self.counters(), "params": pieces}

    def counters(self) -> dict:
        """Iteration, skipped iterations and the loss scaler's state (JSON-serializable)."""
        scaler = None if self.scaler is None else dict(vars(self.scaler))
        return {"iteration": self.iteration, "skipped_iterations": self.skipped_iterations, "scaler": scaler}

    def load_counters(self, counters: dict) -> None:
        self.iteration, self.skipped_iterations = counters["iteration"], counters["skipped_iterations"]
        if self.scaler is not None and counters["scaler"] is not None:
            vars(self.scaler).update(counters["scaler"])

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict() saved under the same layout (megamoe.checkpoint reshards across layouts)."""
        self.load_counters(state)
        mine = {name: (p, flat, main, views) for name, p, flat, main, views in self.pieces()}
        if set(mine) != set(state["params"]):
            missing = sorted(set(mine) ^ set(state["params"]))[:5]
            raise ValueError(f"optimizer state does not match this model: first differing parameters {missing}")
        for name, (p, flat, main, views) in mine.items():
            piece = state["params"][name]
            if tuple(piece["flat"]) != flat or piece["spec"] != dataclasses.asdict(p.spec):
                raise ValueError(f"optimizer state of {name} was saved under another layout; load it through "
                                 f"megamoe.checkpoint, which reshards")
            main.copy_(piece["main"])
            for t, saved in zip(views, piece["state"]):
                t.copy_(saved)
        self.write_main_to_params()

    @torch.no_grad()
    def write_main_to_params(self) -> None:
        """Copy the main values into this rank's parameters where they are a separate (fp32) copy."""
        for r in self.regions:
            if r.main.data_ptr() != r.buffer.param[r.lo:r.hi].data_ptr():
                r.buffer.param[r.lo:r.hi].copy_(r.main)

    def zero_grad(self, ddps: list[DistributedDataParallel]) -> None:
        for ddp in ddps:
            ddp.zero_grad()
