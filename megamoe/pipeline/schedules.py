"""Pipeline schedules: no pipelining, 1F1B, and interleaved 1F1B, run by one executor.

Each rank's order of work follows Megatron-LM:
  * 1F1B (one chunk per stage): stage r of P runs min(P - r - 1, M) warm-up forwards, then alternates one forward
    and one backward, then drains the remaining backwards.
  * interleaved (vpp chunks per stage): micro-batches are taken in groups of P (the last group takes what is left);
    within a group every chunk runs the group's micro-batches in order. Warm-up is 2 (P - r - 1) + (vpp - 1) P
    forwards (everything when M == P), then one forward / one backward, backwards visiting chunks in reverse.
  * no pipelining: every forward and backward of one micro-batch, in turn (gradient accumulation).
Every rank simulates the whole pipeline the same way, in ticks: at each tick a rank runs its next action if the
activation (or gradient) it needs was produced at an earlier tick. The simulation says which tensors cross which
ranks after each tick; each rank then posts all of its sends and receives of that tick as one batched p2p
exchange, in an order both sides derive from the table. So the exchange pattern is deadlock-free by construction
and any M >= P works. Shapes are known ahead ([s(/tp), b, h]), so no shape is ever exchanged, and an activation
that has been sent is freed (its autograd node stays) until its backward.

Loss (Megatron-LM's): each micro-batch's masked per-token loss gives (sum, tokens); backward runs on
sum / tokens / M, or on sum alone with per-token loss (finalize_grads then divides by the step's tokens). MoE aux
losses get the matching gradient scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd import Variable

from megamoe.moe.layer import set_aux_loss_scale
from megamoe.parallel import comm
from megamoe.parallel.mesh import ParallelMesh

FORWARD, BACKWARD = "F", "B"


@dataclass(frozen=True)
class Action:
    kind: str          # "F" or "B"
    micro_batch: int
    virtual_stage: int


def schedule_table(num_microbatches: int, vpp: int, group: int) -> list[tuple[int, int]]:
    """Forward order of (micro-batch, chunk) on a stage: groups of `group` micro-batches, each through every chunk."""
    table = []
    for start in range(0, num_microbatches, group):
        end = num_microbatches if start + group >= num_microbatches else start + group
        table += [(m, c) for c in range(vpp) for m in range(start, end)]
    return table


def stage_actions(stage: int, pp: int, vpp: int, num_microbatches: int, forward_only: bool) -> list[Action]:
    """The order in which pipeline stage `stage` runs its forwards and backwards (see the module docstring)."""
    table = schedule_table(num_microbatches, vpp, pp)
    forwards = [Action(FORWARD, m, c * pp + stage) for m, c in table]
    if forward_only:
        return forwards
    backwards = [Action(BACKWARD, m, (vpp - 1 - c) * pp + stage) for m, c in table]
    total = len(table)
    if vpp == 1:
        warmup = min(pp - stage - 1, num_microbatches)
    elif num_microbatches == pp:
        warmup = total
    else:
        warmup = min(2 * (pp - stage - 1) + (vpp - 1) * pp, total)
    order = forwards[:warmup]
    for k in range(total - warmup):
        order += [forwards[warmup + k], backwards[k]]
    return order + backwards[total - warmup:]


@dataclass
class Plan:
    """The simulated pipeline: per tick, each rank's action (or None) and the tensors crossing ranks after it."""

    ticks: list[list[Action | None]] = field(default_factory=list)
    messages: list[list[tuple[Action, int, int]]] = field(default_factory=list)  # (produced, from rank, to rank)


def simulate(pp: int, vpp: int, num_microbatches: int, forward_only: bool) -> Plan:
    """Run every stage's action order against the data dependencies, tick by tick."""
    orders = [stage_actions(r, pp, vpp, num_microbatches, forward_only) for r in range(pp)]
    last = pp * vpp - 1
    done: dict[tuple[str, int, int], int] = {}
    position = [0] * pp
    plan = Plan()
    tick = 0
    while any(position[r] < len(orders[r]) for r in range(pp)):
        row: list[Action | None] = []
        for r in range(pp):
            action = orders[r][position[r]] if position[r] < len(orders[r]) else None
            if action is not None:
                m, v = action.micro_batch, action.virtual_stage
                need = (FORWARD, m, v - 1) if action.kind == FORWARD else (BACKWARD, m, v + 1)
                external = v > 0 if action.kind == FORWARD else v < last
                if external and done.get(need, tick) >= tick:
                    action = None
            row.append(action)
        if all(a is None for a in row):
            raise RuntimeError(f"pipeline schedule deadlocks (pp {pp}, vpp {vpp}, micro-batches {num_microbatches})")
        sent = []
        for r, action in enumerate(row):
            if action is None:
                continue
            position[r] += 1
            done[action.kind, action.micro_batch, action.virtual_stage] = tick
            v = action.virtual_stage
            if action.kind == FORWARD and v < last:
                sent.append((action, r, (v + 1) % pp))
            elif action.kind == BACKWARD and v > 0:
                sent.append((action, r, (v - 1) % pp))
        plan.ticks.append(row)
        plan.messages.append([msg for msg in sent if msg[1] != msg[2]])
        tick += 1
    return plan


@dataclass
class StepOutput:
    """Per micro-batch (loss sum, loss tokens) on the last pipeline stage; empty elsewhere. Forward-only steps
    also keep each micro-batch's per-token loss [b, s] (before the loss mask) in token_losses."""

    losses: list[tuple[torch.Tensor, torch.Tensor]]
    token_losses: list[torch.Tensor] = field(default_factory=list)

    def mean_loss(self) -> float | None:
        """Megatron's reported loss: the mean over micro-batches of each one's per-token mean."""
        if not self.losses:
            return None
        return sum((s / n).item() for s, n in self.losses) / len(self.losses)

    def num_tokens(self) -> torch.Tensor:
        return sum(n for _, n in self.losses) if self.losses else torch.zeros(())


def _run_backward(output: torch.Tensor, grad: torch.Tensor | None) -> None:
    # The output's data may have been freed after sending (its shape no longer matches the gradient's), so call
    # the autograd engine directly, as Megatron-LM does.
    Variable._execution_engine.run_backward(
        tensors=(output,), grad_tensors=(grad if grad is not None else torch.ones_like(output),),
        keep_graph=False, create_graph=False, inputs=tuple(), allow_unreachable=True, accumulate_grad=True)


def forward_backward(chunks: list[nn.Module], batches: list[dict], mesh: ParallelMesh, *,
                     forward_only: bool = False, per_token_loss: bool = False, record: list | None = None,
                     grad_scale: float = 1.0, ddps: list | None = None) -> StepOutput:
    """Run every micro-batch of `batches` through this rank's model chunks, forward and (unless forward_only)
    backward, accumulating gradients.

    Args:
        chunks: this rank's model chunks (one per virtual stage it runs, in chunk order).
        batches: one dict per micro-batch with tokens [b, s], labels [b, s], loss_mask [b, s] and optionally
            position_ids, attention_mask, sample_ids; every rank gets the same list.
        record: if given, the executed actions and exchanges are appended (for tests and debugging).
        grad_scale: multiplies what backward starts from (the fp16 loss scale).
        ddps: the chunks' DistributedDataParallel wrappers; overlapped gradient reduction is enabled only during
            each chunk's last backward of the step.
    """
    pp, num_mb = mesh.config.pp, len(batches)
    if len(chunks) > 1 and num_mb < pp:
        raise ValueError(f"the interleaved schedule needs at least --pipeline-model-parallel-size ({pp}) "
                         f"micro-batches, got {num_mb}; raise --global-batch-size or lower --micro-batch-size")
    step = _Step(chunks, batches, mesh, forward_only, per_token_loss, grad_scale, ddps, record)
    plan = simulate(pp, len(chunks), num_mb, forward_only)
    for row, messages in zip(plan.ticks, plan.messages):
        action = row[mesh.pp_stage]
        if action is not None:
            step.forward(action) if action.kind == FORWARD else step.backward(action)
        step.exchange(messages)
    return StepOutput([step.losses[m] for m in sorted(step.losses)],
                      [step.token_losses[m] for m in sorted(step.token_losses)])


class _Step:
    """The tensors of one step in flight on this rank, keyed by (micro-batch, virtual stage)."""

    def __init__(self, chunks, batches, mesh, forward_only, per_token_loss, grad_scale, ddps, record) -> None:
        self.chunks, self.batches, self.mesh = chunks, batches, mesh
        self.forward_only, self.per_token_loss, self.grad_scale = forward_only, per_token_loss, grad_scale
        self.ddps, self.record = ddps, record
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}    # activations received from the previous stage
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}   # kept for backward (or until sent)
        self.grads: dict[tuple[int, int], torch.Tensor] = {}     # gradients to send back, or received
        self.losses: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.token_losses: dict[int, torch.Tensor] = {}
        self.backwards_done = [0] * len(chunks)

    def _chunk(self, virtual_stage: int):
        return self.chunks[virtual_stage // self.mesh.config.pp]

    def forward(self, action: Action) -> None:
        m, v = action.micro_batch, action.virtual_stage
        chunk, batch, num_mb = self._chunk(v), self.batches[m], len(self.batches)
        mask = batch["loss_mask"]
        scale = float(mask.sum()) if self.per_token_loss else 1.0 / num_mb
        set_aux_loss_scale(chunk, self.grad_scale * scale)
        with torch.set_grad_enabled(not self.forward_only):
            common = dict(position_ids=batch.get("position_ids"), attention_mask=batch.get("attention_mask"),
                          sample_ids=batch.get("sample_ids"))
            labels = batch["labels"] if chunk.post_process else None
            if chunk.pre_process:
                out = chunk(input_ids=batch["tokens"], labels=labels, **common)
            else:
                out = chunk(hidden_states=self.inputs[m, v], labels=labels, **common)
            if chunk.post_process:
                loss_sum = (out.float() * mask).sum()
                tokens = mask.sum().to(torch.float32)
                self.losses[m] = (loss_sum.detach(), tokens)
                if self.forward_only:
                    self.token_losses[m] = out.detach()
                out = (loss_sum if self.per_token_loss else loss_sum / tokens / num_mb) * self.grad_scale
        if not (self.forward_only and chunk.post_process):  # kept for its backward, or until it is sent
            self.outputs[m, v] = out
        self._note(action)

    def backward(self, action: Action) -> None:
        m, v = action.micro_batch, action.virtual_stage
        if self.ddps is not None:  # overlapped reduction only during the chunk's last backward of the step
            c = v // self.mesh.config.pp
            self.ddps[c].grad_sync_enabled = self.backwards_done[c] == len(self.batches) - 1
            self.backwards_done[c] += 1
        _run_backward(self.outputs.pop((m, v)), self.grads.pop((m, v), None))
        received = self.inputs.pop((m, v), None)
        if received is not None:
            self.grads[m, v - 1] = received.grad  # sent to the previous virtual stage by the exchange
        self._note(action)

    def _note(self, action: Action) -> None:
        if self.record is not None:
            self.record.append((action.kind, action.micro_batch, action.virtual_stage))

    def exchange(self, messages) -> None:
        """This tick's sends and receives, as one batched p2p exchange over the pipeline group."""
        me, sends, recvs, activations = self.mesh.pp_stage, [], [], []
        for produced, src, dst in sorted(messages, key=lambda x: (x[0].kind, x[0].micro_batch, x[0].virtual_stage)):
            m, v = produced.micro_batch, produced.virtual_stage
            if src == me and produced.kind == FORWARD:
                out = self.outputs.pop((m, v)) if self.forward_only else self.outputs[m, v]
                sends.append((out.detach().clone(), dst))
                if not self.forward_only:
                    # Free the sent activation's storage; its autograd node (and so its backward) stays.
                    out.data = torch.empty((1,), dtype=out.dtype, device=out.device)
            elif src == me:
                sends.append((self.grads.pop((m, v - 1)), dst))
            elif dst == me:
                buffer = torch.empty(self._activation_shape(m), dtype=next(self.chunks[0].parameters()).dtype,
                                     device=self.mesh.device)
                recvs.append((buffer, src))
                if produced.kind == FORWARD:
                    self.inputs[m, v + 1] = buffer
                    activations.append(buffer)
                else:
                    self.grads[m, v - 1] = buffer
        if not sends and not recvs:
            return
        if self.record is not None:
            self.record.append(("X", [d for _, d in sends], [s for _, s in recvs]))
        comm.send_recv(self.mesh["pp"], sends=sends, recvs=recvs)
        for buffer in activations:  # a leaf of this stage's graph once filled
            buffer.requires_grad_(not self.forward_only)

    def _activation_shape(self, m: int) -> tuple[int, int, int]:
        b, s = self.batches[m]["tokens"].shape
        config = self.mesh.config
        return (s // config.tp if config.sequence_parallel else s, b, self.chunks[0].config.hidden_size)


def _from_iterator(chunks, data_iterator, mesh, *, num_microbatches: int, seq_length: int, micro_batch_size: int,
                   forward_only: bool = False, per_token_loss: bool = False, **kwargs) -> StepOutput:
    # Shapes are checked before any communication, so a wrong one fails on every rank instead of hanging a receive.
    batches = [next(data_iterator) for _ in range(num_microbatches)]
    for batch in batches:
        if tuple(batch["tokens"].shape) != (micro_batch_size, seq_length):
            raise ValueError(f"a micro-batch has shape {tuple(batch['tokens'].shape)}, but --micro-batch-size "
                             f"{micro_batch_size} and --seq-length {seq_length} make ({micro_batch_size}, {seq_length})")
    return forward_backward(chunks, batches, mesh, forward_only=forward_only, per_token_loss=per_token_loss, **kwargs)


def forward_backward_no_pipelining(chunks, data_iterator, mesh, **kwargs) -> StepOutput:
    """Gradient accumulation over num_microbatches on one stage (pp = 1). Keyword arguments: num_microbatches,
    seq_length, micro_batch_size, forward_only, per_token_loss, and forward_backward's grad_scale and ddps."""
    if mesh.config.pp != 1:
        raise ValueError("forward_backward_no_pipelining is for --pipeline-model-parallel-size 1")
    return _from_iterator(chunks, data_iterator, mesh, **kwargs)


def forward_backward_pipelining_without_interleaving(chunks, data_iterator, mesh, **kwargs) -> StepOutput:
    """1F1B over pp stages, one model chunk per stage (arguments as forward_backward_no_pipelining)."""
    if len(chunks) != 1:
        raise ValueError("the non-interleaved schedule runs one model chunk per stage")
    return _from_iterator(chunks, data_iterator, mesh, **kwargs)


def forward_backward_pipelining_with_interleaving(chunks, data_iterator, mesh, **kwargs) -> StepOutput:
    """Interleaved 1F1B over pp stages with vpp model chunks each (arguments as forward_backward_no_pipelining)."""
    if len(chunks) < 2:
        raise ValueError("the interleaved schedule needs --virtual-pipeline-model-parallel-size > 1")
    return _from_iterator(chunks, data_iterator, mesh, **kwargs)


def get_forward_backward_func(mesh: ParallelMesh):
    """The schedule for the mesh's pp and vpp, as Megatron-LM chooses it."""
    if mesh.config.pp == 1:
        return forward_backward_no_pipelining
    if (mesh.config.vpp or 1) > 1:
        return forward_backward_pipelining_with_interleaving
    return forward_backward_pipelining_without_interleaving
