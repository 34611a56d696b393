"""Causal attention, forward + backward: torch's scaled_dot_product_attention (--attention-backend flash) against
megamoe's block-causal attention (unfused/local, and auto on CPU): time, achieved GFLOP/s and fraction of the
measured matmul peak.

    python bench/attention.py [--fp32] [--batch 4] [--heads 8] [--groups 4] [--seq 512] [--head-dim 64]

FLOPs counted are Megatron's: QK^T and PV, halved by the causal mask, x3 for training (6 b heads s^2 d).
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.matmul_peak import measure_peak  # noqa: E402
from bench.moe_layer import timed  # noqa: E402
from megamoe.model.block_attention import block_causal_attention  # noqa: E402
from megamoe.training.allocator import keep_freed_memory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    keep_freed_memory()  # as pretrain_gpt.py does on CPU
    b, h, g, s, d = args.batch, args.heads, args.groups, args.seq, args.head_dim
    peak = measure_peak(dtype)
    q = torch.randn(b, h, s, d, dtype=dtype)
    k, v = torch.randn(b, g, s, d, dtype=dtype), torch.randn(b, g, s, d, dtype=dtype)
    grad = torch.randn(b, h, s, d, dtype=dtype)
    rows = lambda t: t.view(b, g, h // g, s, d).transpose(2, 3).reshape(b, g, -1, d)  # noqa: E731

    def sdpa():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        F.scaled_dot_product_attention(*inputs, is_causal=True, enable_gqa=True).backward(grad)

    def block():
        inputs = [rows(q).requires_grad_()] + [t.detach().requires_grad_() for t in (k, v)]
        block_causal_attention(*inputs, block=args.block).backward(rows(grad))

    flops = 6 * b * h * s * s * d
    print(f"{dtype}, batch {b}, heads {h}, groups {g}, seq {s}, head dim {d}, threads {torch.get_num_threads()}, "
          f"measured matmul peak {peak:.1f} GFLOP/s")
    for name, fn in (("sdpa", sdpa), (f"block-causal ({args.block})", block)):
        seconds = timed(fn, args.repeats)
        print(f"{name:>20}: {seconds * 1000:7.1f} ms, {flops / seconds / 1e9:6.1f} GFLOP/s = "
              f"{flops / seconds / 1e9 / peak:.1%} of peak")


if __name__ == "__main__":
    main()
