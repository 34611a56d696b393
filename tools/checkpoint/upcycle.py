"""Turn a dense megamoe checkpoint into an MoE one whose output equals the dense model's (see
megamoe/checkpoint/upcycle.py for how; pretrain_gpt.py --moe-use-upcycling does the same at start-up).

    python tools/checkpoint/upcycle.py --load-dir dense_ckpt --save-dir moe_ckpt --num-experts 8 \\
        --moe-router-topk 2 [--moe-upcycling-granularity 1] [--seed 1234]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megamoe.checkpoint.hf import model_flags  # noqa: E402
from megamoe.checkpoint.upcycle import upcycle  # noqa: E402
from megamoe.moe.config import MoEConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load-dir", required=True, help="dense megamoe checkpoint (or its --save directory)")
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--num-experts", type=int, required=True)
    parser.add_argument("--moe-router-topk", type=int, default=2)
    parser.add_argument("--moe-upcycling-granularity", type=int, default=1)
    parser.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1234, help="draws the router weights")
    args = parser.parse_args(argv)
    try:
        moe = MoEConfig(num_experts=args.num_experts, router_topk=args.moe_router_topk,
                        aux_loss_coeff=args.moe_aux_loss_coeff)
        path, model = upcycle(args.load_dir, args.save_dir, moe, args.moe_upcycling_granularity, args.seed)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}. Flags of its model:\n{' '.join(model_flags(model))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
