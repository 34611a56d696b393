"""The machine's measured matmul peak: large square torch.mm, median of repeated runs, in GFLOP/s.

Other benchmarks import measure_peak() so every "fraction of peak" they print is against a peak measured in the
same run, on the same threads.
"""

import argparse
import time

import torch


def measure_peak(dtype: torch.dtype = torch.bfloat16, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n x n x n matmul in `dtype` (2 n^3 FLOPs): the best of `repeats` timed runs after warm-up.

    The best, not the median: a peak is what the machine can do, and on a shared 2-core machine the slow runs
    measure the neighbours."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}")
    for dtype in (torch.bfloat16, torch.float32):
        print(f"{str(dtype).replace('torch.', ''):>9}  {measure_peak(dtype, args.size):8.1f} GFLOP/s")


if __name__ == "__main__":
    main()
