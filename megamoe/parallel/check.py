"""Check a layout on the real launched world: `torchrun --nproc-per-node 8 -m megamoe.parallel.check --tp 2 --ep 4`.

Every rank joins the world (torchrun's or SLURM's variables), builds the ParallelMesh, and sums its global rank over
each of its groups; a sum that differs from the layout's prediction means a group does not span the ranks it
should. Rank 0 prints the result and the traffic ledger. Invalid sizes fail on every rank before any collective.
"""

import argparse
import sys
import time
from datetime import timedelta

import torch

from megamoe.parallel import comm
from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.layout import GROUP_KINDS
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.world import init_distributed, read_launch_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megamoe.parallel.check", description=__doc__.splitlines()[0])
    ParallelConfig.add_arguments(parser)
    parser.add_argument("--distributed-timeout-minutes", type=float, default=10.0)
    args = parser.parse_args(argv)
    launch = read_launch_env()
    try:  # validated from the launcher's world size before the first collective
        config = ParallelConfig.from_args(args, world_size=launch.world_size)
    except ValueError as err:
        print(f"rank {launch.rank}: error: {err}", file=sys.stderr)
        return 2
    timeout = timedelta(minutes=args.distributed_timeout_minutes)
    init_distributed(timeout=timeout)
    start = time.perf_counter()
    mesh = ParallelMesh(config, timeout=timeout)
    built = time.perf_counter() - start
    wrong = []
    with mesh.ledger.recording():
        for kind in GROUP_KINDS:
            group = mesh[kind]
            if group is None:
                continue
            total = torch.tensor([float(mesh.rank)], device=mesh.device)
            comm.all_reduce(total, group)
            if int(total.item()) != sum(group.ranks):
                wrong.append(f"{kind}: sum {int(total.item())} over {list(group.ranks)}")
        failures = torch.tensor([float(len(wrong))], device=mesh.device)
        comm.all_reduce(failures, mesh.world)
    for line in wrong:
        print(f"rank {mesh.rank}: group mismatch {line}", file=sys.stderr)
    if mesh.rank == 0:
        verdict = "passed" if failures.item() == 0 else f"FAILED on {int(failures.item())} groups"
        print(f"layout check {verdict}: {config.world_size} ranks, backend {mesh.backend}, device {mesh.device}, "
              f"groups built in {built:.2f} s")
        print(mesh.layout.format_table())
        print("\ntraffic of the check on rank 0:")
        print(mesh.ledger.format_table())
    torch.distributed.destroy_process_group()
    return 0 if failures.item() == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
