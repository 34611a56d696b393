"""finalize_grads: everything that must happen to gradients between the last backward and the optimizer step.

In order (all are sums, so the order only matters for what is still local):
  1. tied word embeddings on different pipeline stages: the first stage's embedding and the last stage's output
     layer are one parameter, so their gradients are summed over the embedding group;
  2. data parallelism: dense gradients are summed over dp x cp, expert gradients over expert-dp (by the
     DistributedDataParallel buckets when given, else one all-reduce per parameter);
  3. sequence-parallel parameters (norms, row-parallel biases, the router under SP): each tp rank saw a sequence
     shard, so their gradients are summed over tp;
  4. division by dp (the loss is a mean over replicas; an expert's replicas together saw every dp replica's
     tokens), or, with per-token loss, by the global batch's token count;
  5. the MoE layers' end of step: expert biases move by the step's routed counts (summed over dp), and
     global_aux_loss starts counting afresh.
"""

from __future__ import annotations

import torch
from torch import nn

from megamoe.moe.layer import end_of_step
from megamoe.parallel import comm
from megamoe.parallel.mesh import ParallelMesh

WORD_EMBEDDING = "embedding.word_embeddings.weight"
TIED_OUTPUT = "output_layer.weight"


def _grads(chunks: list[nn.Module]):
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            grad = getattr(param, "main_grad", None)
            grad = grad if grad is not None else param.grad
            if grad is not None:
                yield chunk, name, param, grad


def finalize_grads(chunks: list[nn.Module], mesh: ParallelMesh, num_tokens: torch.Tensor | None = None,
                   ddps: list | None = None) -> None:
    """Reduce the gradients of this rank's model chunks in place.

    Args:
        num_tokens: with per-token loss, the step's loss tokens as counted on the last pipeline stage (any value
            elsewhere); broadcast over pp, summed over dp and used as the divisor. None: per-micro-batch mean.
        ddps: the chunks' DistributedDataParallel wrappers, when gradients live in their buffers; their buckets
            (some perhaps already reduced during backward) do the data-parallel step.
    """
    if mesh.config.pp > 1 and mesh["embd"] is not None:
        # Before the data-parallel step: with the distributed optimizer each stage keeps only its own shard after.
        # finish_grad_sync zeroes the gradients no parameter got, but this sum reads main_grad before it does.
        for ddp in ddps or ():
            ddp.zero_unwritten_grads()
        for chunk, name, _, grad in _grads(chunks):
            tied = not chunk.config.untie_embeddings_and_output_weights
            if tied and (name == WORD_EMBEDDING or name == TIED_OUTPUT):
                comm.all_reduce(grad, mesh["embd"])
    if ddps is not None:
        for ddp in ddps:
            ddp.finish_grad_sync()
    else:
        for _, _, param, grad in _grads(chunks):
            comm.all_reduce(grad, mesh["edp"] if param.spec.experts is not None else mesh["dp_cp"])
    # tp ranks hold the same buffer layout, so even a sharded buffer's valid shard adds up correctly here.
    for _, _, param, grad in _grads(chunks):
        if param.spec.sequence_parallel:
            comm.all_reduce(grad, mesh["tp"])
    if num_tokens is not None:
        # Only the last pipeline stage computed the loss: it tells the others, then replicas add up.
        total = num_tokens.detach().clone().to(torch.float64).reshape(1)
        comm.broadcast(total, mesh["pp"], src_index=mesh.config.pp - 1)
        comm.all_reduce(total, mesh["dp_cp"])
        divisor = total.item()
    else:
        divisor = mesh.config.dp
    if divisor != 1:
        for _, _, _, grad in _grads(chunks):
            grad.div_(divisor)
    # MoE bookkeeping of the step: expert-bias updates from the step's routed counts, global_aux_loss reset.
    for chunk in chunks:
        end_of_step(chunk, mesh)
