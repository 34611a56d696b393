"""pretrain(): flags -> validated configs -> mesh -> model chunks -> optimizer -> checkpoint -> data -> training loop.

Every config is built and checked from the flags and the launcher's world size before torch.distributed starts,
and so is the checkpoint to load (its tracker, common.json and tensor shapes against the flags' model), so bad
input fails the same way on every rank and nothing hangs. Each iteration runs the pipeline schedule over the
step's micro-batches, finalizes gradients and steps the optimizer; every --log-interval the last rank prints
Megatron's iteration line and the writers record it (metrics.jsonl, TensorBoard, wandb); every --eval-interval the
validation split is evaluated; every --save-interval, at an exit condition and at the end a checkpoint is saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megamoe.checkpoint.checkpointer import (AsyncSaver, CheckpointConfig, check_model_shapes, expected_model_shapes,
                                             find_checkpoint, load_checkpoint, read_tracker, save_checkpoint)
from megamoe.checkpoint.hf import model_config_from_dict
from megamoe.checkpoint.upcycle import upcycle, upcycled_model
from megamoe.data.builder import DataConfig, build_datasets, build_train_loader, build_loader, split_sample_counts
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
from megamoe.training.allocator import keep_freed_memory
from megamoe.training.config import TrainingConfig, build_parser
from megamoe.training.profiling import ProfileConfig, StepProfiler
from megamoe.training.writers import LoggingConfig, MetricsWriter


@dataclass
class Run:
    """Everything a training run is made of, built once by pretrain()."""

    args: argparse.Namespace
    mesh: ParallelMesh
    model: ModelConfig
    training: TrainingConfig
    checkpoint: CheckpointConfig
    chunks: list
    ddps: list
    optimizer: MegatronOptimizer
    writer: MetricsWriter
    profiler: StepProfiler
    saver: AsyncSaver | None = None
    stop: dict | None = None  # {"signal": True} once SIGTERM arrived (--exit-signal-handler)
    iteration: int = 0
    consumed_samples: int = 0

    def log(self, message: str) -> None:
        """Print on the last rank (the one that holds the loss), like Megatron's print_rank_last."""
        if self.mesh.rank == self.mesh.config.world_size - 1:
            print(message, flush=True)


def pretrain(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    world_size = dist.get_world_size() if dist.is_initialized() else read_launch_env().world_size
    # Everything validated before any collective: the same error on every rank.
    parallel = ParallelConfig.from_args(args, world_size)
    tokenizer = tokenizer_from_args(args)
    model = ModelConfig.from_args(args, tokenizer.vocab_size, MoEConfig.from_args(args))
    model.check_layout(parallel)
    split = PipelineSplit(model.num_layers, parallel.pp, parallel.vpp, args.decoder_first_pipeline_num_layers,
                          args.decoder_last_pipeline_num_layers)
    training = TrainingConfig.from_args(args, parallel.dp)
    training.check(parallel.dp)
    stop = {"signal": False}
    if training.exit_signal_handler:  # from the start: a SIGTERM during set-up stops the run at its first step
        signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    if training.rampup_batch_size and parallel.vpp and training.rampup_batch_size.start < (
            parallel.pp * training.micro_batch_size * parallel.dp):
        raise ValueError(f"--rampup-batch-size: the interleaved schedule needs >= {parallel.pp} micro-batches from "
                         f"the first step; raise the start batch size")
    optimizer_config = optimizer_config_from_args(args)
    schedule = schedule_config_from_args(args, training.train_iters)
    ddp_config = ddp_config_from_args(args)
    data = DataConfig.from_args(args)
    data.check_files()
    logging_config = LoggingConfig.from_args(args)
    logging_config.check()
    profile = ProfileConfig.from_args(args)
    profile.check(world_size)
    checkpoint = CheckpointConfig.from_args(args)
    found, dense = _find_checkpoint(checkpoint, model)

    created_world = not dist.is_initialized()
    if created_world and not torch.cuda.is_available():
        # This process is the training job (not a test or a host program that already runs torch.distributed):
        # large CPU temporaries reuse pages instead of faulting fresh ones (allocator.py).
        keep_freed_memory()
    init_distributed()
    mesh = ParallelMesh(parallel)
    dtype = torch.bfloat16 if optimizer_config.bf16 else torch.float16 if optimizer_config.fp16 else torch.float32
    chunks = build_model_chunks(model, mesh, split, seed=training.seed, dtype=dtype)
    ddps = [DistributedDataParallel(chunk, mesh, ddp_config) for chunk in chunks]
    optimizer = MegatronOptimizer(ddps, mesh, optimizer_config, schedule)
    writer = MetricsWriter(logging_config, vars(args), active=mesh.rank == world_size - 1)
    run = Run(args, mesh, model, training, checkpoint, chunks, ddps, optimizer, writer,
              StepProfiler(profile, mesh.rank), AsyncSaver(mesh) if checkpoint.async_save and checkpoint.save else None,
              stop)
    _report(run)
    if dense is not None:  # --moe-use-upcycling: rank 0 writes the MoE checkpoint, then everyone loads it
        if mesh.rank == 0:
            upcycle(dense.path, checkpoint.save, model.moe, checkpoint.moe_upcycling_granularity, seed=training.seed)
        comm.barrier(mesh.world)
        found = find_checkpoint(dataclasses.replace(checkpoint, load=checkpoint.save, ckpt_step=None))
        run.log(f"upcycled {dense.path} into {found.path}")
    if found is not None:
        for message in found.messages:
            run.log(message)
        finetune = checkpoint.finetune
        load_checkpoint(found, chunks, optimizer, mesh, load_optim=not (checkpoint.no_load_optim or finetune),
                        load_rng=not (checkpoint.no_load_rng or finetune))
        if not finetune:
            run.iteration, run.consumed_samples = found.iteration, found.common["consumed_samples"]
        run.log(f"loaded checkpoint {found.path} at iteration {found.iteration}"
                + (" (--finetune: starting at iteration 0)" if finetune else ""))

    counts = split_sample_counts(training.train_iters, training.eval_interval, training.eval_iters,
                                 training.global_batch_size)
    barrier = lambda: comm.barrier(mesh.world)  # noqa: E731  (rank 0 builds the index caches, the others wait)
    datasets = build_datasets(data, tokenizer.vocab_size, tokenizer.eod, tokenizer.pad if tokenizer.pad is not None
                              else -1, counts, barrier=barrier, build=mesh.rank == 0)
    dp_rank, dp = mesh.coordinates["dp"], mesh.config.dp
    train = build_train_loader(data, datasets[0], run.consumed_samples, training.micro_batch_size, dp_rank, dp,
                               barrier=barrier, build=mesh.rank == 0)
    # Validation continues through its split from one evaluation to the next, as Megatron's iterator does (a
    # resumed run skips what the evaluations before the checkpoint read).
    evaluated = (run.iteration // training.eval_interval) * training.eval_iters * training.global_batch_size
    evaluation = [iter(build_loader(ds, skip, training.micro_batch_size, dp_rank, dp, data.num_workers))
                  if ds is not None and training.eval_iters > 0 else None
                  for ds, skip in zip(datasets[1:], (evaluated, 0))]
    try:
        _train(run, iter(train), evaluation[0])
        if run.saver is not None and (path := run.saver.finish()):
            run.log(f"saved checkpoint {path} (asynchronously)")
        if evaluation[0] is not None:
            _evaluate(run, evaluation[0], "validation")
        if evaluation[1] is not None:
            _evaluate(run, evaluation[1], "test")
    finally:
        run.profiler.close()
        run.writer.close()
    if created_world:
        # Every rank done with the groups before any tears them down (rank 0 also hosts the rendezvous store).
        comm.barrier(mesh.world)
        dist.destroy_process_group()
    return 0


def _find_checkpoint(checkpoint: CheckpointConfig, model: ModelConfig):
    """(checkpoint to load, dense checkpoint to upcycle first), checked against the flags' model before any
    collective. With --moe-use-upcycling a checkpoint already in --save is resumed instead."""
    if checkpoint.moe_use_upcycling:
        if read_tracker(checkpoint.save) is not None:
            resumed = find_checkpoint(dataclasses.replace(checkpoint, load=checkpoint.save, ckpt_step=None))
            check_model_shapes(resumed, model)
            return resumed, None
        dense = find_checkpoint(checkpoint)
        if dense is None:
            raise FileNotFoundError(f"--moe-use-upcycling: no dense checkpoint in --load {checkpoint.load}")
        upcycled = upcycled_model(model_config_from_dict(dense.common["model"]), model.moe,
                                  checkpoint.moe_upcycling_granularity)
        if expected_model_shapes(upcycled) != expected_model_shapes(model):
            raise ValueError(f"--moe-use-upcycling: the dense checkpoint {dense.path} upcycles to a model other than "
                             f"the flags' (dense flags must equal the dense run's; --moe-ffn-hidden-size = "
                             f"--ffn-hidden-size / --moe-upcycling-granularity)")
        return None, dense
    found = find_checkpoint(checkpoint)
    if found is not None:
        check_model_shapes(found, model)
    return found, None


def _report(run: Run) -> None:
    mesh, model = run.mesh, run.model
    counts = parameter_counts(model, mesh.config.tp)
    local = torch.tensor([sum(local_parameter_count(c) for c in run.chunks)], dtype=torch.float64)
    per_rank = torch.zeros(mesh.config.world_size, dtype=torch.float64)
    comm.all_gather_into_tensor(per_rank, local, mesh.world)
    if mesh.rank == 0:
        print(mesh.layout.format_table(), flush=True)
        print(f"parameters: total {counts.total:,}, expert {counts.expert:,}, non-expert {counts.non_expert:,}, "
              f"active per token {counts.active_per_token:,}; per rank "
              f"{', '.join(f'{int(n):,}' for n in per_rank.tolist())}; training FLOPs per sample "
              f"{training_flops_per_sample(model, tp=mesh.config.tp):.4e}", flush=True)
        backends = sorted({layer.experts.backend for c in run.chunks for layer in moe_layers(c)})
        if model.moe is not None and model.moe.grouped_gemm and backends and backends != ["grouped_gemm"]:
            print(f"--moe-grouped-gemm: the grouped_gemm package needs CUDA; experts use {', '.join(backends)} "
                  f"(torch = torch._grouped_mm)", flush=True)


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


def _train(run: Run, train_iter, valid_iter) -> None:
    mesh, training, optimizer = run.mesh, run.training, run.optimizer
    stop = run.stop
    flops_per_sample = training_flops_per_sample(run.model, tp=mesh.config.tp)
    start, window, saved_at = time.time(), [], None
    while run.iteration < training.train_iters:
        run.iteration += 1
        iteration, tick = run.iteration, time.time()
        run.profiler.begin(iteration)
        batch_size = training.batch_size(run.consumed_samples)
        num_mb = batch_size // (training.micro_batch_size * mesh.config.dp)
        batches = _batches(train_iter, num_mb, run.consumed_samples, training.micro_batch_size,
                           mesh.coordinates["dp"], mesh.config.dp)
        out, applied, grad_norm = train_step(run.chunks, run.ddps, optimizer, mesh, batches,
                                             training.calculate_per_token_loss)
        lr_used = learning_rate(optimizer.schedule, optimizer.iteration - 1 if applied else optimizer.iteration)
        run.consumed_samples += batch_size
        loss = _replica_mean_loss(mesh, out)
        if mesh.is_last_stage and not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at iteration {iteration}: lower --lr, raise --clip-grad "
                                     f"or check the data")
        run.profiler.end(iteration)
        window.append((time.time() - tick, loss, batch_size))
        if iteration % training.log_interval == 0:
            _log_iteration(run, window, lr_used, grad_norm, flops_per_sample)
            window = []
        if valid_iter is not None and iteration % training.eval_interval == 0:
            _evaluate(run, valid_iter, "validation")
        checkpoint = run.checkpoint
        if run.saver is not None and (path := run.saver.poll()):
            run.log(f"saved checkpoint {path} (asynchronously)")
        if checkpoint.save and checkpoint.save_interval and iteration % checkpoint.save_interval == 0:
            saved_at = _save(run)
        if _should_exit(run, start, stop):
            if checkpoint.save and saved_at != iteration:
                saved_at = _save(run)
            run.log(f"exiting at iteration {iteration}")
            return
    if run.checkpoint.save and saved_at != run.iteration:
        _save(run)


def train_step(chunks, ddps, optimizer, mesh, batches: list[dict], per_token_loss: bool = False):
    """One training iteration: the pipeline schedule over the step's micro-batches, gradient finalization, the
    optimizer step. Returns (schedule output, whether the update was applied, grad norm)."""
    out = forward_backward(chunks, batches, mesh, per_token_loss=per_token_loss, grad_scale=optimizer.loss_scale,
                           ddps=ddps)
    finalize_grads(chunks, mesh, out.num_tokens() if per_token_loss else None, ddps=ddps)
    applied, grad_norm = optimizer.step()
    optimizer.zero_grad(ddps)
    return out, applied, grad_norm


def _save(run: Run) -> int:
    tick = time.time()
    c = run.checkpoint
    common = {"consumed_samples": run.consumed_samples, "parallel": dataclasses.asdict(run.mesh.config),
              "model": dataclasses.asdict(run.model), "training": dataclasses.asdict(run.training),
              "args": vars(run.args)}
    if run.saver is not None:
        run.saver.save(c.save, run.iteration, run.chunks, run.optimizer, common, save_optim=not c.no_save_optim,
                       save_rng=not c.no_save_rng)
        run.log(f"started saving iteration {run.iteration} in the background ({time.time() - tick:.2f} s blocked)")
        return run.iteration
    path = save_checkpoint(c.save, run.iteration, run.chunks, run.optimizer, run.mesh, common,
                           save_optim=not c.no_save_optim, save_rng=not c.no_save_rng)
    run.log(f"saved checkpoint {path} at iteration {run.iteration} in {time.time() - tick:.2f} s")
    return run.iteration


def _replica_mean_loss(mesh, out) -> float:
    """The step's loss (mean of per-micro-batch means) averaged over data-parallel replicas, on the last stage."""
    if not mesh.is_last_stage:
        return float("nan")
    value = torch.tensor([out.mean_loss()], dtype=torch.float64)
    comm.all_reduce(value, mesh["dp_cp"])
    return value.item() / mesh.config.dp


def _log_iteration(run: Run, window, lr, grad_norm, flops_per_sample) -> None:
    mesh, training, optimizer = run.mesh, run.training, run.optimizer
    elapsed = sum(t for t, _, _ in window) / len(window)
    loss = sum(v for _, v, _ in window) / len(window)
    batch_size = window[-1][2]
    moe_config = run.model.moe
    moe = reduce_metrics({layer.layer_number: layer.metrics for c in run.chunks for layer in moe_layers(c)
                          if layer.metrics}, mesh["dp_cp"], mesh["pp"], run.model.num_layers,
                         moe_config.num_experts if moe_config else 0)
    # Megatron's MoE loss fields: each loss (times its coefficient) averaged over the MoE layers.
    moe_losses = {name: sum(m.get(name, 0.0) for m in moe.values()) / len(moe)
                  for name in ("load_balancing_loss", "z_loss") if any(name in m for m in moe.values())}
    tokens = batch_size * run.model.seq_length
    flops = flops_per_sample * batch_size
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")
    line = (f" [{now}] iteration {run.iteration:8d}/{training.train_iters:8d} | consumed samples: "
            f"{run.consumed_samples:12d} | elapsed time per iteration (ms): {elapsed * 1000:.1f} | throughput per "
            f"GPU (TFLOP/s/GPU): {flops / elapsed / 1e12 / mesh.config.world_size:.3f} | tokens per second: "
            f"{tokens / elapsed:.1f} | learning rate: {lr:.6E} | global batch size: {batch_size:5d} | "
            f"lm loss: {loss:.6E} | ")
    line += "".join(f"{name}: {value:.6E} | " for name, value in moe_losses.items())
    line += (f"loss scale: {optimizer.loss_scale:.1f} | grad norm: {grad_norm or 0.0:.3f} | "
             f"number of skipped iterations: {optimizer.skipped_iterations:3d} | number of nan iterations: {0:3d} |")
    run.log(line)
    run.writer.log("train", run.iteration, {
        "lm loss": loss, "learning rate": lr, "grad norm": grad_norm, "loss scale": optimizer.loss_scale,
        "global batch size": batch_size, "consumed samples": run.consumed_samples, "elapsed ms": elapsed * 1000,
        "tokens per second": tokens / elapsed, **moe_losses}, moe)


def _evaluate(run: Run, iterator, split: str) -> None:
    """--eval-iters forward-only steps on a split (continuing its iterator); logs loss and perplexity."""
    mesh, training = run.mesh, run.training
    num_mb = training.num_microbatches(mesh.config.dp)  # the full global batch, also while ramping up
    for chunk in run.chunks:
        chunk.eval()
    total = 0.0
    for _ in range(training.eval_iters):
        out = forward_backward(run.chunks, [next(iterator) for _ in range(num_mb)], mesh, forward_only=True)
        total += _replica_mean_loss(mesh, out)
    for chunk in run.chunks:
        chunk.train()
    loss = total / training.eval_iters
    ppl = math.exp(min(loss, 20))
    run.log(f" {split} loss at iteration {run.iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |")
    run.writer.log("valid" if split == "validation" else split, run.iteration, {"lm loss": loss, "lm loss PPL": ppl})


def _should_exit(run: Run, start: float, stop: dict) -> bool:
    training = run.training
    if training.exit_interval and run.iteration % training.exit_interval == 0:
        return True
    # Time and signals are agreed on by every rank, so all of them stop (and save) at the same iteration.
    flag = torch.tensor([float(stop["signal"] or (training.exit_duration_in_mins is not None
                                                  and time.time() - start > 60 * training.exit_duration_in_mins))])
    comm.all_reduce(flag, run.mesh.world, op=comm.ReduceOp.MAX)
    return bool(flag.item())
