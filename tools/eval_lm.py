"""Evaluate a megamoe checkpoint: loss and perplexity on a split of --data-path (or --valid-data-path /
--test-data-path), or on a text/JSONL file tokenized on the fly, under any layout (fairseq's eval_lm).

    torchrun --nproc-per-node 4 tools/eval_lm.py --load ckpt --tokenizer-type Llama2Tokenizer --tokenizer-model \\
        tok.model --data-path corpus_text_document --split 98,2,0 --micro-batch-size 4 --full-validation \\
        [--tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2 ...] \\
        [--moe-eval-capacity-token-fraction 0.5] [--output-word-probs probs.jsonl]

The model flags may be left out (they are read from the checkpoint). Prints the token-weighted loss, perplexity,
tokens/s, and per MoE layer the routed tokens per expert and the dropped fraction at the evaluation capacity.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.data.builder import DataConfig, build_datasets  # noqa: E402
from megamoe.inference.evaluation import TextWindows, evaluate  # noqa: E402
from megamoe.inference.profiling import maybe_profile  # noqa: E402
from megamoe.inference.setup import load_model  # noqa: E402
from megamoe.parallel import comm  # noqa: E402
from megamoe.parallel.world import exit_process  # noqa: E402
from megamoe.training.config import build_parser  # noqa: E402
from megamoe.training.profiling import ProfileConfig  # noqa: E402


def add_arguments(parser) -> None:
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-text", default=None, help="a .jsonl ({\"text\": ...} per line) or text file to evaluate")
    g.add_argument("--eval-split", choices=["valid", "test"], default="valid")
    g.add_argument("--full-validation", action="store_true", help="the whole split (else --eval-iters batches)")
    g.add_argument("--output-word-probs", default=None, help="per-token log-probabilities, one JSON line a sample")
    g.add_argument("--output-json", default=None, help="the figures as one JSON object")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "eval_lm.py"
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        if args.eval_text is None:
            data = DataConfig.from_args(args)
            data.check_files()
        elif not os.path.isfile(args.eval_text):
            raise FileNotFoundError(f"--eval-text {args.eval_text} does not exist")
        loaded = load_model(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    mesh, seq = loaded.mesh, loaded.model.seq_length
    args.seq_length = seq  # the checkpoint's when the flag was left out
    samples = None if args.full_validation else args.eval_iters * args.micro_batch_size * mesh.config.dp
    if args.eval_text is not None:
        try:  # the same file on every rank: all of them fail alike, before any collective of the evaluation
            dataset = TextWindows(args.eval_text, loaded.tokenizer, seq)
        except ValueError as err:
            loaded.close()
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        which = 1 if args.eval_split == "valid" else 2
        counts = [0, 0, 0]
        counts[which] = samples or 1  # one sample asked builds one epoch of the split: all of it
        barrier = lambda: comm.barrier(mesh.world)  # noqa: E731
        dataset = build_datasets(DataConfig.from_args(args), loaded.tokenizer.vocab_size, loaded.tokenizer.eod,
                                 loaded.tokenizer.pad if loaded.tokenizer.pad is not None else -1, counts,
                                 barrier=barrier, build=mesh.rank == 0)[which]
        if dataset is None:
            loaded.close()
            print(f"error: the {args.eval_split} split of --data-path is empty (see --split)", file=sys.stderr)
            return 2
    profile = ProfileConfig.from_args(args)
    with maybe_profile(profile.enabled and mesh.rank in profile.ranks, profile.output_dir, mesh.rank,
                       profile.record_shapes):
        result = evaluate(loaded, dataset, args.micro_batch_size, samples, args.output_word_probs)
    if mesh.rank == mesh.config.world_size - 1:
        print(f"{loaded.checkpoint}: {result.tokens} tokens | loss {result.loss:.6f} | perplexity "
              f"{result.perplexity:.4f} | {result.tokens_per_second:.1f} tokens/s", flush=True)
        for layer, m in result.moe.items():
            print(f"  MoE layer {layer}: tokens per expert {m['tokens_per_expert']} | dropped "
                  f"{m['dropped_fraction']:.4f} | entropy {m['entropy']:.4f}", flush=True)
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump({"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens,
                           "tokens_per_second": result.tokens_per_second,
                           "moe": {str(k): v for k, v in result.moe.items()}}, f)
    loaded.close()
    return 0


if __name__ == "__main__":
    exit_process(main())
