"""One MoE layer, forward + backward, per grouped-GEMM backend: time, achieved GFLOP/s, fraction of the measured
matmul peak, and the share of time outside the expert GEMMs (router, permute, combine).

Defaults: bf16, hidden 1024, expert ffn 4096 (SwiGLU), 8 experts, top-2, 4096 tokens, one process.
FLOPs counted are the experts' matmuls only (Megatron's formula: 6 x 3 x h x ffn per routed token for SwiGLU).
"Outside GEMMs" is the time of the same layer with the experts replaced by an identity, over the full time.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.matmul_peak import measure_peak  # noqa: E402
from megamoe.model.config import ModelConfig  # noqa: E402
from megamoe.moe.config import MoEConfig  # noqa: E402
from megamoe.moe.experts import available_backends  # noqa: E402
from megamoe.moe.layer import MoELayer  # noqa: E402
from megamoe.parallel.config import ParallelConfig  # noqa: E402
from megamoe.parallel.mesh import ParallelMesh  # noqa: E402
from megamoe.tensor_parallel.params import initialize_parameters  # noqa: E402
from megamoe.training.allocator import keep_freed_memory  # noqa: E402


class Identity(torch.nn.Module):
    """Stands in for the experts: returns the routed rows unchanged (keeps the autograd graph)."""

    def forward(self, rows, counts):
        return rows * 1.0


def timed(fn, repeats):
    for _ in range(3):  # warm-up: oneDNN compiles a kernel per new GEMM shape, the heap grows to its peak
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    keep_freed_memory()  # as pretrain_gpt.py does on CPU: temporaries reuse pages instead of faulting fresh ones

    peak = measure_peak(dtype)
    mesh = ParallelMesh(ParallelConfig(world_size=1))
    print(f"{args.tokens} tokens, hidden {args.hidden}, expert ffn {args.ffn} (SwiGLU), {args.experts} experts "
          f"top-{args.topk}, {args.dtype}; measured matmul peak {peak:.1f} GFLOP/s")
    print(f"{'backend':>8}  {'fwd+bwd ms':>10}  {'GFLOP/s':>8}  {'of peak':>7}  {'outside GEMMs':>13}")
    flops = 6 * 3 * args.hidden * args.ffn * args.tokens * args.topk
    for backend in available_backends(torch.device("cpu")):
        moe = MoEConfig(num_experts=args.experts, router_topk=args.topk, ffn_hidden_size=args.ffn)
        cfg = ModelConfig(num_layers=1, hidden_size=args.hidden, num_attention_heads=8, vocab_size=128,
                          swiglu=True, add_bias_linear=False, moe=moe)
        layer = MoELayer(cfg, mesh, 0, dtype=dtype)
        initialize_parameters(layer, seed=0)
        layer.experts.backend = backend
        x = torch.randn(args.tokens, 1, args.hidden).to(dtype).requires_grad_()
        upstream = torch.randn_like(x)

        def step():
            layer.zero_grad(set_to_none=True)
            layer(x).backward(upstream)

        total = timed(step, args.repeats)
        # The same layer with the experts replaced by an identity: router, permute, exchange and combine alone.
        experts = layer.experts
        layer.experts = Identity()
        outside = timed(step, args.repeats)
        layer.experts = experts
        print(f"{backend:>8}  {total * 1e3:>10.1f}  {flops / total / 1e9:>8.1f}  {flops / total / 1e9 / peak:>7.1%}  "
              f"{outside / total:>13.1%}")


if __name__ == "__main__":
    main()
