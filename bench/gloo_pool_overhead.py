"""Per-test overhead of the warm gloo pool (tests/pool.py): start-up per world size, and the round trip of a body
that does nothing or one all-reduce. Prints figures; never part of the test pass."""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.pool import GlooPool  # noqa: E402

import bench.pool_bodies as bodies  # noqa: E402


def main() -> None:
    print(f"{'ranks':>5}  {'start (s)':>9}  {'empty body (ms)':>15}  {'one all-reduce (ms)':>19}")
    for world in (1, 2, 4, 8):
        pool = GlooPool(world)
        start = time.perf_counter()
        pool.run(bodies.nothing)
        started = time.perf_counter() - start
        figures = []
        for body in (bodies.nothing, bodies.one_all_reduce):
            times = []
            for _ in range(20):
                t = time.perf_counter()
                pool.run(body)
                times.append(time.perf_counter() - t)
            figures.append(statistics.median(times) * 1e3)
        pool.close()
        print(f"{world:>5}  {started:>9.2f}  {figures[0]:>15.2f}  {figures[1]:>19.2f}")


if __name__ == "__main__":
    main()
