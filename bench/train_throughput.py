"""Training throughput of one process: megamoe's real training step (the pipeline schedule, finalize_grads and the
optimizer of pretrain_gpt.py, with its mixed precision) against Hugging Face transformers' MixtralForCausalLM on
the same model, batch and CPU threads.

    python bench/train_throughput.py --preset small [--fp32] [--compare-hf] [--torch-compile] [--steps 5] [--warmup 2]

Prints tokens/s, model GFLOP/s (Megatron's FLOPs formula), the fraction of the bf16 (or fp32) matmul peak
measured in every round of the same run, and each framework's peak RSS; with --compare-hf, transformers' figures
for the same configuration and the ratio. Figures are medians over the timed steps.

Each framework runs in a worker process of its own, started by this one, and the steps alternate between them
(megamoe, transformers, megamoe, ...), so both see the same minutes of this shared machine; the ratio printed is
the median of the rounds' ratios. The matmul peak is measured in every round too, in megamoe's process right after
its step, and each framework's fraction of the peak is the median of its rounds' fractions: on these shared
machines the best GEMM rate moves by up to a factor of two between minutes, so one peak measured at start-up made
the fraction a reading of the neighbours. Separate processes keep each framework's allocator as it runs (--malloc)
and keep oneDNN's compiled-kernel cache, which transformers' expert GEMMs churn every step, out of megamoe's process.

With --compare-hf each timed step starts after --settle idle seconds (default 3). On a virtual machine with free
page reporting (virtio-balloon; machine B of the README has it) the guest hands memory that a process freed back to
the host about a second later, and while the host takes it the running step loses time: transformers, with glibc's
defaults, frees and maps again about 0.5 GiB a step, and the megamoe step right after it ran 15-20% slower (steal
time showed in /proc/stat) than after a megamoe step, an idle pause or a transformers step with megamoe's allocator
setting. The pause lets that work finish between the frameworks' steps instead of inside the next one's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.matmul_peak import measure_peak  # noqa: E402
from megamoe.distributed.data_parallel import DDPConfig, DistributedDataParallel  # noqa: E402
from megamoe.model.accounting import training_flops_per_sample  # noqa: E402
from megamoe.model.config import ModelConfig  # noqa: E402
from megamoe.moe.config import MoEConfig  # noqa: E402
from megamoe.optim.lr_scheduler import ScheduleConfig  # noqa: E402
from megamoe.optim.optimizer import MegatronOptimizer, OptimizerConfig  # noqa: E402
from megamoe.parallel.config import ParallelConfig  # noqa: E402
from megamoe.parallel.mesh import ParallelMesh  # noqa: E402
from megamoe.pipeline.stages import PipelineSplit, build_model_chunks  # noqa: E402
from megamoe.training.allocator import keep_freed_memory  # noqa: E402
from megamoe.training.loop import train_step  # noqa: E402

PRESETS = {
    "tiny": dict(hidden_size=256, ffn_hidden_size=512, num_layers=4, num_attention_heads=8, num_query_groups=4),
    "small": dict(hidden_size=512, ffn_hidden_size=1024, num_layers=8, num_attention_heads=8, num_query_groups=4),
}


def model_config(preset: str, seq: int, vocab: int, experts: int, topk: int, **overrides) -> ModelConfig:
    return ModelConfig(**PRESETS[preset], vocab_size=vocab, seq_length=seq, normalization="RMSNorm",
                       position_embedding_type="rope", swiglu=True, add_bias_linear=False,
                       untie_embeddings_and_output_weights=True, hidden_dropout=0.0, attention_dropout=0.0,
                       make_vocab_size_divisible_by=128,
                       moe=MoEConfig(num_experts=experts, router_topk=topk, aux_loss_coeff=0.01, grouped_gemm=True),
                       **overrides)


def batches(config: ModelConfig, micro_batch: int, count: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in range(count):
        tokens = torch.randint(0, config.vocab_size, (micro_batch, config.seq_length + 1), generator=g)
        out.append(dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(micro_batch, config.seq_length),
                        sample_ids=torch.arange(m * micro_batch, (m + 1) * micro_batch)))
    return out


class MegamoeStep:
    """megamoe's training step on one process: AdamW, fp32 main parameters and gradients, bf16 compute."""

    def __init__(self, config: ModelConfig, bf16: bool, micro_batch: int) -> None:
        mesh = ParallelMesh(ParallelConfig(world_size=1))
        self.mesh = mesh
        self.chunks = build_model_chunks(config, mesh, PipelineSplit(config.num_layers, 1, None), seed=1,
                                         dtype=torch.bfloat16 if bf16 else torch.float32)
        self.ddps = [DistributedDataParallel(c, mesh, DDPConfig()) for c in self.chunks]
        self.optimizer = MegatronOptimizer(self.ddps, mesh, OptimizerConfig(bf16=bf16, clip_grad=1.0),
                                           ScheduleConfig(lr=1e-4, decay_iters=1000))
        self.batch = batches(config, micro_batch, 1)

    def __call__(self) -> float:
        out, _, _ = train_step(self.chunks, self.ddps, self.optimizer, self.mesh, self.batch)
        return out.mean_loss()


class HFStep:
    """transformers' MixtralForCausalLM with torch.optim.AdamW (fused: its fastest CPU mode), clipping as megamoe."""

    def __init__(self, config: ModelConfig, bf16: bool, micro_batch: int) -> None:
        import transformers

        hf = transformers.MixtralConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_query_groups, num_local_experts=config.moe.num_experts,
            num_experts_per_tok=config.moe.router_topk, max_position_embeddings=config.seq_length,
            tie_word_embeddings=False, router_aux_loss_coef=0.01, output_router_logits=True, use_cache=False)
        torch.manual_seed(0)
        self.model = transformers.MixtralForCausalLM(hf).to(torch.bfloat16 if bf16 else torch.float32).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        b = batches(config, micro_batch, 1)[0]
        self.ids = b["tokens"]
        self.labels = b["labels"]

    def __call__(self) -> float:
        logits = self.model(input_ids=self.ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


MALLOC = {
    # how each framework runs by default: megamoe as pretrain_gpt.py sets it up, transformers as it comes
    "as-run": {"megamoe": True, "hf": False},
    "default": {"megamoe": False, "hf": False},   # glibc's defaults for both
    "tuned": {"megamoe": True, "hf": True},       # megamoe's keep_freed_memory() for both
}


def _worker(conn, name: str, config: ModelConfig, bf16: bool, micro_batch: int, tuned_malloc: bool,
            peak_repeats: int) -> None:
    """One framework's step in a process of its own: builds it, then answers the parent's requests."""
    if tuned_malloc:
        keep_freed_memory()
    step = (MegamoeStep if name == "megamoe" else HFStep)(config, bf16, micro_batch)
    conn.send(tuned_malloc)
    while True:
        request, argument = conn.recv()
        if request == "step":
            start = time.perf_counter()
            step()
            conn.send(time.perf_counter() - start)
        elif request == "peak":
            conn.send(measure_peak(torch.bfloat16 if bf16 else torch.float32, repeats=peak_repeats))
        elif request == "profile":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            conn.send(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=argument))
        elif request == "rss":
            conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10)
        else:
            return


class Worker:
    """The parent's handle on a _worker process."""

    def __init__(self, name: str, *args) -> None:
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no state inherited from this one
        self.conn, child = spawn.Pipe()
        self.process = spawn.Process(target=_worker, args=(child, name, *args), daemon=True)
        self.process.start()
        self.tuned_malloc = self.conn.recv()

    def ask(self, request: str, argument=None):
        self.conn.send((request, argument))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(("stop", None))
        self.process.join()


def time_steps(workers: dict[str, Worker], warmup: int, timed: int,
               settle: float) -> tuple[dict[str, list[float]], list[float]]:
    """Each worker runs `warmup` steps, then `timed` rounds of one step each, alternating between workers, each
    timed step after `settle` idle seconds when there are several workers. Returns each worker's step times and,
    for every round, the matmul peak measured by the first worker after its step."""
    for worker in workers.values():
        for _ in range(warmup):
            worker.ask("step")
    times, peaks = {name: [] for name in workers}, []
    first = next(iter(workers.values()))
    for _ in range(timed):
        for name, worker in workers.items():
            if len(workers) > 1:
                time.sleep(settle)  # the other process's freed memory is handed back before this step starts
            times[name].append(worker.ask("step"))
            if worker is first:
                peaks.append(first.ask("peak"))
    return times, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--fp32", action="store_true", help="fp32 compute instead of bf16")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-repeats", type=int, default=5,
                        help="timed 2048^3 matmuls per round's peak measurement (the best of them is the peak)")
    parser.add_argument("--compare-hf", action="store_true")
    parser.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    parser.add_argument("--torch-compile", action="store_true",
                        help="megamoe with --torch-compile (the warm-up steps include the compilation)")
    parser.add_argument("--malloc", choices=sorted(MALLOC), default="as-run",
                        help="as-run (default): megamoe keeps freed memory in its process "
                             "(megamoe.training.allocator.keep_freed_memory(), as pretrain_gpt.py does on CPU), "
                             "transformers runs with glibc's defaults, as it does; default: glibc's defaults for "
                             "both; tuned: keep_freed_memory() for both")
    parser.add_argument("--settle", type=float, default=3.0, metavar="SECONDS",
                        help="with --compare-hf, idle seconds before each timed step (see the module docstring); "
                             "0 to alternate at once")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, print megamoe's N most expensive ops over one profiled step")
    args = parser.parse_args()
    if args.settle < 0:
        parser.error(f"--settle must be 0 or more seconds, got {args.settle}")
    bf16 = not args.fp32
    dtype = torch.bfloat16 if bf16 else torch.float32
    recompute = {} if args.recompute == "none" else (
        dict(recompute_granularity="selective") if args.recompute == "selective" else
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1))
    config = model_config(args.preset, args.seq_length, args.vocab_size, args.num_experts, args.topk,
                          torch_compile=args.torch_compile, **recompute)
    names = ["megamoe", "hf"] if args.compare_hf else ["megamoe"]
    workers = {name: Worker(name, config, bf16, args.micro_batch_size, MALLOC[args.malloc][name], args.peak_repeats)
               for name in names}
    print(f"preset {args.preset}, {'bf16' if bf16 else 'fp32'}, seq {args.seq_length}, micro batch "
          f"{args.micro_batch_size}, threads {torch.get_num_threads()}, malloc keeps freed memory: "
          + ", ".join(f"{name} {worker.tuned_malloc}" for name, worker in workers.items()))
    times, peaks = time_steps(workers, args.warmup, args.steps, args.settle)
    print(f"measured {dtype} matmul peak, per round: median {statistics.median(peaks):.1f} GFLOP/s (min "
          f"{min(peaks):.1f}, max {max(peaks):.1f})")
    tokens = args.micro_batch_size * args.seq_length
    flops = training_flops_per_sample(config) * args.micro_batch_size
    for name, values in times.items():
        median = statistics.median(values)
        fractions = [flops / t / 1e9 / peak for t, peak in zip(values, peaks)]  # each round against its peak
        print(f"{name:>8}: {tokens / median:8.1f} tokens/s (min {tokens / max(values):.1f}, max "
              f"{tokens / min(values):.1f}), {flops / median / 1e9:6.1f} model GFLOP/s = "
              f"{statistics.median(fractions):.1%} of peak (rounds: {min(fractions):.1%} to {max(fractions):.1%}), "
              f"step {median * 1000:.0f} ms, peak RSS {workers[name].ask('rss'):.0f} MiB")
    if "hf" in times:
        # Each round's ratio (adjacent steps, the same minute of the machine), then their median.
        ratios = [hf / ours for ours, hf in zip(times["megamoe"], times["hf"])]
        print(f"megamoe / transformers: {statistics.median(ratios):.2f}x (rounds: min {min(ratios):.2f}x, max "
              f"{max(ratios):.2f}x)")
    if args.profile:
        print(workers["megamoe"].ask("profile", args.profile))
    for worker in workers.values():
        worker.close()


if __name__ == "__main__":
    main()
