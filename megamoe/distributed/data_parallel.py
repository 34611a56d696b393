"""Data parallelism: contiguous gradient (and parameter) buffers, buckets in backward order, their reduction.

Each model chunk's parameters are packed into one buffer per reduction group: dense parameters reduce over
dp x cp, expert parameters over expert-dp. A buffer holds
    grad   fp32, where every parameter's gradient accumulates (param.main_grad is a view); with bf16/fp16
           parameters this is the fp32 accumulation the mixed-precision optimizer needs;
    param  the parameters themselves (param.data is a view), so the distributed optimizer can all-gather updated
           shards straight into them.
Parameters are laid out in reverse registration order (roughly the order backward produces gradients) and cut
into buckets of about bucket_size elements, each padded to a multiple of the group size so it splits into equal
shards. A post-accumulate hook moves each gradient into main_grad (a cast copy for the parameter's first gradient
of the step, an add for later micro-batches' ones); with overlap_grad_reduce the bucket's
reduction (all-reduce, or reduce-scatter into this rank's shard under the distributed optimizer) starts as soon as
its last gradient arrives on the last micro-batch. finish_grad_sync() starts what is left and waits.
Because the first gradient overwrites, zero_grad() zeroes nothing by default (a full-buffer fill was about 1% of a
CPU step): like torch's zero_grad(set_to_none=True), it leaves main_grad undefined until the step's backward, and
only the parameters that got no gradient are zeroed, by zero_unwritten_grads(), before any reduction reads them.
Code that writes main_grad by hand and then finalizes calls zero_grad(set_to_none=False). Padding is zero from
construction and stays zero: reductions add zeros and the optimizer only scales it.
Tied embedding weights on separate pipeline stages sit in a bucket of their own that is never overlapped, so
finalize_grads can add the two stages' gradients before that bucket is reduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from megamoe.parallel import comm
from megamoe.parallel.group import AxisGroup
from megamoe.parallel.mesh import ParallelMesh

TIED_NAMES = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass(frozen=True)
class DDPConfig:
    """Megatron-LM's flags: --ddp-bucket-size (elements; None: max(40M, 1M x dp)), --overlap-grad-reduce,
    --use-distributed-optimizer, --overlap-param-gather (the optimizer's parameter all-gathers run in the
    background and each module waits, just before its forward, for the buckets holding its parameters)."""

    bucket_size: int | None = None
    overlap_grad_reduce: bool = False
    use_distributed_optimizer: bool = False
    overlap_param_gather: bool = False

    def __post_init__(self) -> None:
        if self.bucket_size is not None and self.bucket_size <= 0:
            raise ValueError(f"--ddp-bucket-size must be > 0, got {self.bucket_size}")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError("--overlap-param-gather needs --use-distributed-optimizer (only sharded parameters are "
                             "gathered)")


def add_ddp_arguments(parser) -> None:
    g = parser.add_argument_group("data parallelism", "Megatron-LM's gradient-buffer flags")
    g.add_argument("--ddp-bucket-size", type=int, default=None)
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")


def ddp_config_from_args(args) -> DDPConfig:
    return DDPConfig(args.ddp_bucket_size, args.overlap_grad_reduce, args.use_distributed_optimizer,
                     args.overlap_param_gather)


@dataclass
class Bucket:
    """A contiguous range [start, end) of a buffer and the parameters in it."""

    start: int
    end: int
    params: list[nn.Parameter]
    overlap: bool = True
    ready: int = 0
    pending: object | None = None
    shard_output: torch.Tensor | None = None
    param_gather: object | None = None  # the optimizer's all-gather of this bucket's parameters, in flight

    def shard(self, group: AxisGroup) -> tuple[int, int]:
        """This rank's [start, end) of the bucket under the distributed optimizer."""
        size = (self.end - self.start) // group.size
        return self.start + group.index * size, self.start + (group.index + 1) * size


@dataclass
class GradBuffer:
    """One reduction group's parameters and fp32 gradients, packed (see the module docstring)."""

    group: AxisGroup
    grad: torch.Tensor
    param: torch.Tensor
    buckets: list[Bucket]
    offsets: dict[nn.Parameter, int] = field(default_factory=dict)


def _pack(named: list[tuple[str, nn.Parameter]], group: AxisGroup, bucket_size: int, device) -> GradBuffer:
    # Buckets: consecutive parameters until bucket_size is reached; tied weights alone, last, never overlapped.
    late = [(n, p) for n, p in named if n in TIED_NAMES and getattr(p, "late_reduction", False)]
    regular = [(n, p) for n, p in named if not (n in TIED_NAMES and getattr(p, "late_reduction", False))]
    plan, current = [], []
    for _, p in regular:
        current.append(p)
        if sum(q.numel() for q in current) >= bucket_size:
            plan.append((current, True))
            current = []
    if current:
        plan.append((current, True))
    if late:
        plan.append(([p for _, p in late], False))
    dtype = named[0][1].dtype
    offsets, buckets, position = {}, [], 0
    for params, overlap in plan:
        start = position
        for p in params:
            offsets[p] = position
            position += p.numel()
        position = start + -(-(position - start) // group.size) * group.size  # pad to equal shards
        buckets.append(Bucket(start, position, params, overlap))
    grad = torch.zeros(position, dtype=torch.float32, device=device)
    param = torch.zeros(position, dtype=dtype, device=device)
    for p, off in offsets.items():
        param[off:off + p.numel()].copy_(p.detach().reshape(-1))
        p.data = param[off:off + p.numel()].view_as(p)
        p.main_grad = grad[off:off + p.numel()].view_as(p)
    return GradBuffer(group, grad, param, buckets, offsets)


class DistributedDataParallel:
    """Gradient buffers and their data-parallel reduction for one model chunk.

    Args:
        module: the model chunk (its parameters must carry ParamSpecs).
        mesh: the layout (dense parameters reduce over mesh["dp_cp"], experts over mesh["edp"]).
        config: bucket size, overlap, distributed optimizer.
    """

    def __init__(self, module: nn.Module, mesh: ParallelMesh, config: DDPConfig) -> None:
        self.module, self.mesh, self.config = module, mesh, config
        self.grad_sync_enabled = True
        tied = (mesh.config.pp > 1 and not module.config.untie_embeddings_and_output_weights)
        named = list(module.named_parameters())
        for name, p in named:
            p.late_reduction = tied and name in TIED_NAMES
        bucket_size = config.bucket_size or max(40_000_000, 1_000_000 * mesh.config.dp)
        self.buffers: list[GradBuffer] = []
        for is_expert, group in ((False, mesh["dp_cp"]), (True, mesh["edp"])):
            members = [(n, p) for n, p in reversed(named) if (p.spec.experts is not None) == is_expert]
            if members:
                self.buffers.append(_pack(members, group, bucket_size, mesh.device))
        self._bucket_of = {p: (buf, b) for buf in self.buffers for b in buf.buckets for p in b.params}
        self._written: set[nn.Parameter] = set()  # parameters whose main_grad holds a value of this step
        for _, p in named:
            p.register_post_accumulate_grad_hook(self._hook)
        if config.overlap_param_gather:
            self._register_param_waits()

    def _register_param_waits(self) -> None:
        # Each module waits, before its forward, for the buckets holding its own parameters. A parameter holder
        # whose forward is never called (the experts' weights) is waited for by its parent, which uses them.
        modules = dict(self.module.named_modules())
        users: dict[nn.Module, set[int]] = {}
        for name, module in modules.items():
            own = list(module.parameters(recurse=False))
            if own:
                user = module if _is_called(module) else modules[name.rpartition(".")[0]]
                users.setdefault(user, set()).update(id(self._bucket_of[p][1]) for p in own)
        bucket_by_id = {id(b): b for buffer in self.buffers for b in buffer.buckets}
        for user, ids in users.items():
            buckets = tuple(bucket_by_id[i] for i in sorted(ids))
            user.register_forward_pre_hook(lambda _module, _args, buckets=buckets: self._wait(buckets))

    @staticmethod
    def _wait(buckets) -> None:
        for bucket in buckets:
            if bucket.param_gather is not None:
                bucket.param_gather.wait()
                bucket.param_gather = None

    def finish_param_sync(self) -> None:
        """Wait for every parameter all-gather still in flight (before reading parameters outside a forward)."""
        self._wait([b for buffer in self.buffers for b in buffer.buckets])

    def _hook(self, param: nn.Parameter) -> None:
        if param in self._written:
            param.main_grad.add_(param.grad)
        else:  # the first gradient of the step: a cast copy, cheaper than a mixed-dtype add into zeros
            param.main_grad.copy_(param.grad)
            self._written.add(param)
        param.grad = None
        if self.config.overlap_grad_reduce and self.grad_sync_enabled:
            buffer, bucket = self._bucket_of[param]
            bucket.ready += 1
            if bucket.overlap and bucket.ready == len(bucket.params):
                self._start(buffer, bucket)

    def _start(self, buffer: GradBuffer, bucket: Bucket) -> None:
        data = buffer.grad[bucket.start:bucket.end]
        if self.config.use_distributed_optimizer:
            lo, hi = bucket.shard(buffer.group)
            bucket.shard_output = torch.empty(hi - lo, dtype=data.dtype, device=data.device)
            bucket.pending = comm.reduce_scatter_tensor(bucket.shard_output, data, buffer.group, async_op=True)
        else:
            bucket.pending = comm.all_reduce(data, buffer.group, async_op=True)

    def finish_grad_sync(self) -> None:
        """Reduce every bucket not reduced yet (after zeroing the gradients of parameters that got none), wait
        for all, and reset for the next step's backward. A bucket the hook started early had all its gradients."""
        self.zero_unwritten_grads()
        for buffer in self.buffers:
            for bucket in buffer.buckets:
                if bucket.pending is None:
                    self._start(buffer, bucket)
                bucket.pending.wait()
                if bucket.shard_output is not None:
                    lo, hi = bucket.shard(buffer.group)
                    buffer.grad[lo:hi].copy_(bucket.shard_output)
                bucket.pending, bucket.shard_output, bucket.ready = None, None, 0

    def zero_unwritten_grads(self) -> None:
        """Zero the main_grad of every parameter that got no gradient since zero_grad(), so that every main_grad
        holds this step's gradient. finish_grad_sync() does it before reducing; call it before reading main_grad
        earlier (finalize_grads' tied-embedding sum does)."""
        for p in self._bucket_of:
            if p not in self._written:  # no gradient this step: main_grad still holds the last step's
                p.main_grad.zero_()
                self._written.add(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Start a new step. set_to_none (default): main_grad is undefined until each parameter's first gradient
        overwrites it, and zero for those that get none (see the module docstring). False: fill the buffers with
        zeros now, so that values written into main_grad by hand are kept and gradients add to them."""
        if set_to_none:
            self._written.clear()
            return
        for buffer in self.buffers:
            buffer.grad.zero_()
        self._written.update(self._bucket_of)


def _is_called(module: nn.Module) -> bool:
    """Whether a leaf module's own forward is called: pure parameter holders (no forward of their own) are not."""
    return type(module).forward is not nn.Module.forward
