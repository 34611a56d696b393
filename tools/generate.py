"""Generate text from a megamoe checkpoint: greedy or sampled (temperature, top-k, top-p), with a KV cache, under
tp and ep (experts sharded) and data-parallel over prompts.

    torchrun --nproc-per-node 4 tools/generate.py --load ckpt --tokenizer-type Llama2Tokenizer \\
        --tokenizer-model tok.model --prompts prompts.txt --max-new-tokens 64 [--top-k 40 --temperature 0.8] \\
        [--tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2] [--output out.jsonl]

Prompts: one per line of a text file, or a .jsonl file with a "prompt" (or "text") field, or "-" for stdin. The
model flags may be left out (read from the checkpoint). The last rank prints each prompt and its completion
(and writes --output as JSON lines, in input order).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.inference.generation import SamplingConfig, generate  # noqa: E402
from megamoe.inference.profiling import maybe_profile  # noqa: E402
from megamoe.inference.setup import load_model  # noqa: E402
from megamoe.parallel.world import exit_process  # noqa: E402
from megamoe.training.config import build_parser  # noqa: E402
from megamoe.training.profiling import ProfileConfig  # noqa: E402


def add_arguments(parser) -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--prompts", required=True, help="text file (a prompt a line), .jsonl, or - for stdin")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--greedy", action="store_true", help="argmax (the default unless --top-k/--top-p/--temperature)")
    g.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix every step")
    g.add_argument("--output", default=None, help="JSON lines: prompt, completion, token ids")


def read_prompts(path: str) -> list[str]:
    lines = (sys.stdin if path == "-" else open(path)).read().splitlines()
    if path.endswith(".jsonl"):
        prompts = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not ({"prompt", "text"} & set(record)):
                    raise ValueError(f"{path}:{number}: expected a JSON object with a \"prompt\" field")
                prompts.append(record.get("prompt", record.get("text")))
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt")
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "generate.py"
    add_arguments(parser)
    args = parser.parse_args(argv)
    sampled = args.top_k or args.top_p < 1.0 or args.temperature != 1.0
    try:
        config = SamplingConfig(args.max_new_tokens, args.greedy or not sampled, args.temperature, args.top_k,
                                args.top_p, args.seed, not args.no_kv_cache)
        texts = read_prompts(args.prompts)
        loaded = load_model(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prompts = [loaded.tokenizer.tokenize(t) for t in texts]
    start = time.perf_counter()
    try:
        profile = ProfileConfig.from_args(args)
        mesh = loaded.mesh
        with maybe_profile(profile.enabled and mesh.rank in profile.ranks, profile.output_dir, mesh.rank,
                           profile.record_shapes):
            outputs = generate(loaded, prompts, config)
    except ValueError as err:  # raised on every rank alike, before any collective
        print(f"error: {err}", file=sys.stderr)
        loaded.close()
        return 2
    seconds = time.perf_counter() - start
    if loaded.mesh.rank == loaded.mesh.config.world_size - 1:
        records = [{"prompt": t, "completion": loaded.tokenizer.detokenize(o), "tokens": o}
                   for t, o in zip(texts, outputs)]
        for r in records:
            print(json.dumps(r), flush=True)
        generated = sum(len(o) for o in outputs)
        print(f"{len(records)} prompts, {generated} tokens in {seconds:.2f} s ({generated / seconds:.1f} tokens/s)",
              flush=True)
        if args.output:
            with open(args.output, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
    loaded.close()
    return 0


if __name__ == "__main__":
    exit_process(main())
