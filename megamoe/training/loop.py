"""pretrain(): flags -> validated configs -> mesh -> model chunks -> optimizer -> data -> training loop.

Every config is built and checked from the flags and the launcher's world size before torch.distributed starts,
so bad input fails the same way on every rank and nothing hangs. Each iteration runs the pipeline schedule over
the step's micro-batches, finalizes gradients, steps the optimizer, and every --log-interval prints Megatron's
iteration line (on the last rank) and appends one JSON object to {log_dir}/metrics.jsonl.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import signal
import time

import torch

from megamoe.data.builder import DataConfig, build_datasets, build_loader, split_sample_counts
from megamoe.data.tokenizers import tokenizer_from_args
from megamoe.distributed.data_parallel import DistributedDataParallel, ddp_config_from_args
from megamoe.distributed.finalize import finalize_grads
from megamoe.model.accounting import local_parameter_count, parameter_counts, training_flops_per_sample
from megamoe.model.config import ModelConfig
from megamoe.moe.config import MoEConfig
from megamoe.moe.layer import moe_layers
from megamoe.moe.metrics import reduce_metrics
from megamoe.optim.lr_scheduler import learning_rate, schedule_config_from_args
from megamoe.optim.optimizer import MegatronOptimizer, optimizer_config_from_args
from megamoe.parallel import comm
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.world import init_distributed, read_launch_env
from megamoe.pipeline.schedules import forward_backward
from megamoe.pipeline.stages import PipelineSplit, build_model_chunks
from megamoe.training.config import TrainingConfig, build_parser


def _log(mesh: ParallelMesh, message: str, rank: int | None = None) -> None:
    if mesh.rank == (mesh.config.world_size - 1 if rank is None else rank):
        print(message, flush=True)


def pretrain(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    launch = read_launch_env()
    # Everything validated before any collective: the same error on every rank.
    parallel = ParallelConfig.from_args(args, launch.world_size)
    tokenizer = tokenizer_from_args(args)
    model = ModelConfig.from_args(args, tokenizer.vocab_size, MoEConfig.from_args(args))
    model.check_layout(parallel)
    split = PipelineSplit(model.num_layers, parallel.pp, parallel.vpp, args.decoder_first_pipeline_num_layers,
                          args.decoder_last_pipeline_num_layers)
    training = TrainingConfig.from_args(args, parallel.dp)
    training.check(parallel.dp)
    optimizer_config = optimizer_config_from_args(args)
    schedule = schedule_config_from_args(args, training.train_iters)
    ddp_config = ddp_config_from_args(args)
    data = DataConfig.from_args(args)
    data.check_files()
    if args.save or args.load:
        raise ValueError("--save / --load: checkpointing is not available yet in this version of megamoe")

    init_distributed()
    mesh = ParallelMesh(parallel)
    dtype = torch.bfloat16 if optimizer_config.bf16 else torch.float16 if optimizer_config.fp16 else torch.float32
    chunks = build_model_chunks(model, mesh, split, seed=training.seed, dtype=dtype)
    ddps = [DistributedDataParallel(chunk, mesh, ddp_config) for chunk in chunks]
    optimizer = MegatronOptimizer(ddps, mesh, optimizer_config, schedule)
    _report(mesh, model, chunks, training)

    counts = split_sample_counts(training.train_iters, training.eval_interval, training.eval_iters,
                                 training.global_batch_size)
    barrier = lambda: comm.barrier(mesh.world)  # noqa: E731  (rank 0 builds the index caches, the others wait)
    datasets = build_datasets(data, tokenizer.vocab_size, tokenizer.eod, tokenizer.pad if tokenizer.pad is not None
                              else -1, counts, barrier=barrier, build=mesh.rank == 0)
    dp_rank, dp = mesh.coordinates["dp"], mesh.config.dp
    loaders = [build_loader(ds, 0, training.micro_batch_size, dp_rank, dp, data.num_workers) if ds is not None
               else None for ds in datasets]
    num_mb = training.num_microbatches(dp)
    return _train(args, mesh, chunks, ddps, optimizer, schedule, training, loaders, num_mb, model)


def _report(mesh, model, chunks, training) -> None:
    counts = parameter_counts(model, mesh.config.tp)
    local = sum(local_parameter_count(c) for c in chunks)
    if mesh.rank == 0:
        print(mesh.layout.format_table(), flush=True)
        print(f"parameters: total {counts.total:,}, expert {counts.expert:,}, non-expert {counts.non_expert:,}, "
              f"active per token {counts.active_per_token:,}, on rank 0 {local:,}; training FLOPs per sample "
              f"{training_flops_per_sample(model, tp=mesh.config.tp):.4e}", flush=True)


def _batches(iterator, num_mb: int, consumed: int, micro_batch_size: int, dp_rank: int, dp: int) -> list[dict]:
    """The step's micro-batches for this rank, each with the global ids of its samples (the positions the
    pretraining sampler gives it), which name dropout masks and routing draws whatever the layout."""
    batches = []
    for m in range(num_mb):
        batch = next(iterator)
        first = consumed + m * micro_batch_size * dp + dp_rank * micro_batch_size
        batch["sample_ids"] = torch.arange(first, first + micro_batch_size)
        batches.append(batch)
    return batches


def _train(args, mesh, chunks, ddps, optimizer, schedule, training, loaders, num_mb, model) -> int:
    stop = {"signal": False}
    if training.exit_signal_handler:
        signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    metrics_file = None
    if training.log_dir and mesh.rank == mesh.config.world_size - 1:
        os.makedirs(training.log_dir, exist_ok=True)
        metrics_file = open(os.path.join(training.log_dir, "metrics.jsonl"), "a")
    train_iter = iter(loaders[0])
    flops = training_flops_per_sample(model, tp=mesh.config.tp) * training.global_batch_size
    start, consumed, window = time.time(), 0, []
    dp_rank = mesh.coordinates["dp"]
    for iteration in range(1, training.train_iters + 1):
        tick = time.time()
        batches = _batches(train_iter, num_mb, consumed, training.micro_batch_size, dp_rank, mesh.config.dp)
        out = forward_backward(chunks, batches, mesh, per_token_loss=training.calculate_per_token_loss,
                               grad_scale=optimizer.loss_scale, ddps=ddps)
        finalize_grads(chunks, mesh, out.num_tokens() if training.calculate_per_token_loss else None, ddps=ddps)
        applied, grad_norm = optimizer.step()
        lr_used = learning_rate(schedule, optimizer.iteration - 1 if applied else optimizer.iteration)
        optimizer.zero_grad(ddps)
        consumed += training.global_batch_size
        loss = _replica_mean_loss(mesh, out)
        if mesh.is_last_stage and not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at iteration {iteration}: lower --lr, raise --clip-grad "
                                     f"or check the data")
        window.append((time.time() - tick, loss))
        if iteration % training.log_interval == 0:
            _log_iteration(mesh, training, iteration, consumed, window, lr_used, grad_norm, optimizer, flops,
                           chunks, metrics_file)
            window = []
        if loaders[1] is not None and iteration % training.eval_interval == 0:
            _evaluate(mesh, chunks, loaders[1], training, num_mb, iteration)
        if _should_exit(mesh, training, iteration, start, stop):
            _log(mesh, f"exiting at iteration {iteration}")
            break
    if metrics_file is not None:
        metrics_file.close()
    torch.distributed.destroy_process_group()
    return 0


def _replica_mean_loss(mesh, out) -> float:
    """The step's loss (mean of per-micro-batch means) averaged over data-parallel replicas, on the last stage."""
    if not mesh.is_last_stage:
        return float("nan")
    value = torch.tensor([out.mean_loss()], dtype=torch.float64)
    comm.all_reduce(value, mesh["dp_cp"])
    return value.item() / mesh.config.dp


def _log_iteration(mesh, training, iteration, consumed, window, lr, grad_norm, optimizer, flops, chunks,
                   metrics_file) -> None:
    elapsed = sum(t for t, _ in window) / len(window)
    loss = sum(v for _, v in window) / len(window)
    moe = reduce_metrics({layer.layer_number: layer.metrics for c in chunks for layer in moe_layers(c)
                          if layer.metrics}, mesh["dp_cp"])
    aux = sum(m.get("aux_loss", 0.0) for m in moe.values())
    tokens = training.global_batch_size * chunks[0].config.seq_length
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")
    line = (f" [{now}] iteration {iteration:8d}/{training.train_iters:8d} | consumed samples: {consumed:12d} | "
            f"elapsed time per iteration (ms): {elapsed * 1000:.1f} | throughput per GPU (TFLOP/s/GPU): "
            f"{flops / elapsed / 1e12 / mesh.config.world_size:.3f} | tokens per second: {tokens / elapsed:.1f} | "
            f"learning rate: {lr:.6E} | global batch size: {training.global_batch_size:5d} | lm loss: {loss:.6E} | ")
    if moe:
        line += f"load_balancing_loss: {aux:.6E} | "
    line += (f"loss scale: {optimizer.loss_scale:.1f} | grad norm: {grad_norm or 0.0:.3f} | "
             f"number of skipped iterations: {optimizer.skipped_iterations:3d} | number of nan iterations: {0:3d} |")
    _log(mesh, line)
    if metrics_file is not None:
        metrics_file.write(json.dumps({"iteration": iteration, "consumed_samples": consumed, "lm loss": loss,
                                       "learning rate": lr, "grad norm": grad_norm, "elapsed ms": elapsed * 1000,
                                       "tokens per second": tokens / elapsed,
                                       "moe": {str(k): v for k, v in moe.items()}}) + "\n")
        metrics_file.flush()


def _evaluate(mesh, chunks, loader, training, num_mb, iteration) -> None:
    for chunk in chunks:
        chunk.eval()
    iterator, total = iter(loader), 0.0
    for _ in range(training.eval_iters):
        out = forward_backward(chunks, [next(iterator) for _ in range(num_mb)], mesh, forward_only=True)
        total += _replica_mean_loss(mesh, out)
    for chunk in chunks:
        chunk.train()
    loss = total / training.eval_iters
    _log(mesh, f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | "
               f"lm loss PPL: {math.exp(min(loss, 20)):.6E} |")


def _should_exit(mesh, training, iteration, start, stop) -> bool:
    if training.exit_interval and iteration % training.exit_interval == 0:
        return True
    # Time and signals are agreed on by every rank, so all of them stop at the same iteration.
    flag = torch.tensor([float(stop["signal"] or (training.exit_duration_in_mins is not None
                                                  and time.time() - start > 60 * training.exit_duration_in_mins))])
    comm.all_reduce(flag, mesh.world, op=comm.ReduceOp.MAX)
    return bool(flag.item())
