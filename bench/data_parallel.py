"""Data-parallel step time and bytes moved, with and without the distributed optimizer and overlap, against the
closed form. Run: torchrun --standalone --nproc-per-node 4 bench/data_parallel.py

Closed form per step for a buffer of S bytes (padded) over n data-parallel ranks, per rank:
    replicated optimizer   all-reduce of the gradients          wire 2 (n-1)/n S
    distributed optimizer  reduce-scatter of the gradients      wire (n-1)/n S
                           all-gather of the updated parameters wire (n-1)/n S    (same total, 1/n of the state)
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.distributed.data_parallel import DDPConfig, DistributedDataParallel  # noqa: E402
from megamoe.distributed.finalize import finalize_grads  # noqa: E402
from megamoe.model.config import ModelConfig  # noqa: E402
from megamoe.model.gpt import GPTModel  # noqa: E402
from megamoe.optim.lr_scheduler import ScheduleConfig  # noqa: E402
from megamoe.optim.optimizer import MegatronOptimizer, OptimizerConfig  # noqa: E402
from megamoe.parallel.config import ParallelConfig  # noqa: E402
from megamoe.parallel.mesh import ParallelMesh  # noqa: E402
from megamoe.parallel.world import init_distributed  # noqa: E402
from megamoe.pipeline.schedules import forward_backward  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    launch = init_distributed()
    mesh = ParallelMesh(ParallelConfig(world_size=launch.world_size))
    cfg = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4, vocab_size=4096,
                      seq_length=128, normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                      add_bias_linear=False, untie_embeddings_and_output_weights=True, hidden_dropout=0.0,
                      attention_dropout=0.0)
    g = torch.Generator().manual_seed(mesh.rank)
    batches = [dict(tokens=torch.randint(0, 4096, (4, 128), generator=g),
                    labels=torch.randint(0, 4096, (4, 128), generator=g), loss_mask=torch.ones(4, 128))
               for _ in range(2)]
    schedule = ScheduleConfig(lr=1e-4, decay_iters=100, decay_style="constant")
    rows = []
    for distributed in (False, True):
        for overlap in (False, True):
            model = GPTModel(cfg, mesh, seed=0)
            ddp = DistributedDataParallel(model, mesh, DDPConfig(bucket_size=1_000_000, overlap_grad_reduce=overlap,
                                                                 use_distributed_optimizer=distributed))
            opt = MegatronOptimizer([ddp], mesh, OptimizerConfig(use_distributed_optimizer=distributed), schedule)
            times = []
            for step in range(4):
                mesh.ledger.reset()
                start = time.perf_counter()
                with mesh.ledger.recording():
                    forward_backward([model], batches, mesh, ddps=[ddp])
                    finalize_grads([model], mesh, ddps=[ddp])
                    opt.step()
                opt.zero_grad([ddp])
                if step:  # the first step warms up
                    times.append(time.perf_counter() - start)
            n, size = mesh["dp_cp"].size, sum(b.grad.numel() * 4 for b in ddp.buffers)
            wire = mesh.ledger.total(axis="dp_cp").wire_bytes
            predicted = 2 * (n - 1) * size // n
            rows.append((distributed, overlap, statistics.median(times), wire, predicted, opt.state_bytes()))
    if mesh.rank == 0:
        print(f"dp {mesh.config.dp}, {sum(p.numel() for p in model.parameters()):,} parameters, 2 micro-batches of "
              f"4 x 128 tokens, gloo on CPU")
        print(f"{'dist. opt.':>10}  {'overlap':>7}  {'step ms':>8}  {'dp wire bytes':>14}  {'closed form':>12}  "
              f"{'opt. state bytes':>16}")
        for distributed, overlap, t, wire, predicted, state in rows:
            print(f"{str(distributed):>10}  {str(overlap):>7}  {t * 1e3:>8.1f}  {wire:>14,}  {predicted:>12,}  "
                  f"{state:>16,}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
