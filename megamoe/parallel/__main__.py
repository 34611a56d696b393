"""Print the rank layout of a parallel configuration: `python -m megamoe.parallel --world-size 16 --tp 2 --pp 2 --ep 4`.

Without --json: a per-rank table (coordinates on every axis, pipeline stage) and every group.
With --json: {"groups": {...}, "dp": N, "edp": N}. Invalid sizes exit with status 2 and the reasons.
"""

import argparse
import sys

from megamoe.parallel.config import ParallelConfig
from megamoe.parallel.layout import RankLayout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megamoe.parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, required=True, help="number of ranks")
    parser.add_argument("--json", action="store_true", help="print the groups as JSON")
    ParallelConfig.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = ParallelConfig.from_args(args, world_size=args.world_size)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    layout = RankLayout.from_config(config)
    print(layout.to_json() if args.json else layout.format_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
