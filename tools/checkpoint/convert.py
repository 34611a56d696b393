"""Convert checkpoints between Hugging Face (Mixtral, Mistral, Llama; safetensors) and megamoe.

    python tools/checkpoint/convert.py --loader hf --saver megamoe --load-dir Mixtral-8x7B --save-dir ckpt \\
        [--target-tensor-parallel-size 2 --target-pipeline-parallel-size 4 --target-expert-parallel-size 8]
    python tools/checkpoint/convert.py --loader megamoe --saver hf --load-dir ckpt [--ckpt-step N] --save-dir out

megamoe checkpoints hold global tensors, so one converted checkpoint loads under every layout; the --target-*
sizes (Megatron's flags) are checked against the model and printed with the pretrain_gpt.py flags to use.
Tensors stream one at a time (memory bounded by the largest few tensors, not the model).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from megamoe.checkpoint.checkpointer import checkpoint_dir  # noqa: E402
from megamoe.checkpoint.convert import hf_to_megamoe, megamoe_to_hf  # noqa: E402
from megamoe.checkpoint.hf import model_flags  # noqa: E402
from megamoe.parallel.config import ParallelConfig  # noqa: E402

LOADERS = {"hf": "hf", "mixtral_hf": "hf", "llama_mistral": "hf", "megamoe": "megamoe", "mcore": "megamoe"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_size(text: str) -> int:
    units = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[:-len(unit)]) * factor)
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-type", default="GPT", choices=["GPT"], help="accepted (Megatron's flag)")
    parser.add_argument("--loader", required=True, choices=sorted(LOADERS))
    parser.add_argument("--saver", required=True, choices=sorted(LOADERS))
    parser.add_argument("--load-dir", required=True)
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--ckpt-step", type=int, default=None, help="megamoe loader: this iteration, not the tracker's")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the source's")
    parser.add_argument("--seq-length", type=int, default=None, help="hf loader: default min(max positions, 4096)")
    parser.add_argument("--max-shard-size", default="5GB", help="hf saver: largest safetensors file")
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1)
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--target-expert-parallel-size", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    loader, saver = LOADERS[args.loader], LOADERS[args.saver]
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if (loader, saver) == ("hf", "megamoe"):
            path, model = hf_to_megamoe(args.load_dir, args.save_dir, dtype, args.seq_length,
                                        progress=not args.no_progress)
            tp, pp, ep = (args.target_tensor_parallel_size, args.target_pipeline_parallel_size,
                          args.target_expert_parallel_size)
            layout = ParallelConfig(world_size=tp * pp * ep, tp=tp, pp=pp, ep=ep, etp=1 if ep > 1 else None,
                                    sequence_parallel=tp > 1)
            model.check_layout(layout)
            print(f"wrote {path}; it loads under any layout, e.g. tp {tp} pp {pp} ep {ep}. Flags of its model:")
            print(" ".join(model_flags(model)))
        elif (loader, saver) == ("megamoe", "hf"):
            source = checkpoint_dir(args.load_dir, args.ckpt_step) if args.ckpt_step is not None else args.load_dir
            files = megamoe_to_hf(source, args.save_dir, dtype, parse_size(args.max_shard_size),
                                  progress=not args.no_progress)
            print(f"wrote {args.save_dir}: {', '.join(files)}")
        else:
            parser.error(f"--loader {args.loader} --saver {args.saver}: convert between hf and megamoe")
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
