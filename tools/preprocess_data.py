"""Tokenize a jsonl corpus into Megatron's indexed dataset: one document per line.

python tools/preprocess_data.py --input corpus.jsonl --output-prefix out/corpus --tokenizer-type Llama2Tokenizer
    --tokenizer-model tok.model --append-eod --workers 2

Writes {output-prefix}_{key}_document.bin/.idx for every --json-keys key, in input order whatever --workers is
(so the bytes do not depend on it). Empty documents are skipped, as Megatron skips them. A line that is not JSON
or lacks a key stops the run with its line number, or is skipped and counted with --skip-bad-lines.
"""

import argparse
import json
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from megamoe.data.indexed_dataset import IndexedDatasetBuilder, optimal_dtype  # noqa: E402
from megamoe.data.tokenizers import TOKENIZER_TYPES, build_tokenizer  # noqa: E402

_WORKER = {}  # per worker process: its tokenizer (set once by _init; worker-local, not shared state)


def _init(tokenizer_kwargs: dict, keys: list[str], append_eod: bool) -> None:
    _WORKER.update(tokenizer=build_tokenizer(**tokenizer_kwargs), keys=keys, append_eod=append_eod)


def _encode(numbered_line: tuple[int, str]):
    number, line = numbered_line
    try:
        record = json.loads(line)
        texts = {key: record[key] for key in _WORKER["keys"]}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return number, None, f"{type(err).__name__}: {err}", len(line)
    tokenizer = _WORKER["tokenizer"]
    out = {}
    for key, text in texts.items():
        ids = tokenizer.tokenize(text) if text else []
        if ids and _WORKER["append_eod"]:
            ids.append(tokenizer.eod)
        out[key] = ids
    return number, out, None, len(line)


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, help="a jsonl file, one document per line")
    g.add_argument("--json-keys", nargs="+", default=["text"])
    g.add_argument("--split-sentences", action="store_true", help="not supported: megamoe writes documents")
    g.add_argument("--keep-newlines", action="store_true", help="accepted for compatibility (no sentence split)")
    g.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines instead of stopping")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model")
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--vocab-size", type=int)
    g.add_argument("--append-eod", action="store_true")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True)
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, required=True)
    g.add_argument("--partitions", type=int, default=1, help="accepted for compatibility; output is one file")
    g.add_argument("--log-interval", type=int, default=1000)
    args = p.parse_args(argv)
    if args.split_sentences:
        p.error("--split-sentences is not supported; megamoe preprocesses whole documents")
    if not os.path.isfile(args.input):
        p.error(f"--input {args.input} does not exist")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    tokenizer_kwargs = dict(tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                            vocab_file=args.vocab_file, merge_file=args.merge_file, vocab_size=args.vocab_size)
    tokenizer = build_tokenizer(**tokenizer_kwargs)  # fails here, before any worker starts, on a bad tokenizer
    dtype = optimal_dtype(tokenizer.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    prefixes = {key: f"{args.output_prefix}_{key}_document" for key in args.json_keys}
    builders = {key: IndexedDatasetBuilder(prefix + ".bin", dtype) for key, prefix in prefixes.items()}
    start, bad, docs, size = time.time(), 0, 0, os.path.getsize(args.input)
    with open(args.input, encoding="utf-8") as f, tqdm(total=size, unit="B", unit_scale=True, desc="tokenizing",
                                                       mininterval=1.0) as bar:
        lines = ((n, line) for n, line in enumerate(f, start=1) if line.strip())
        if args.workers == 1:
            _init(tokenizer_kwargs, args.json_keys, args.append_eod)
            results = map(_encode, lines)
            pool = None
        else:
            pool = multiprocessing.Pool(args.workers, _init, (tokenizer_kwargs, args.json_keys, args.append_eod))
            results = pool.imap(_encode, lines, chunksize=64)  # imap keeps input order
        try:
            for number, encoded, error, nbytes in results:
                bar.update(nbytes + 1)
                if error is not None:
                    if not args.skip_bad_lines:
                        print(f"error: {args.input} line {number}: {error} (use --skip-bad-lines to skip such "
                              f"lines)", file=sys.stderr)
                        return 1
                    bad += 1
                    continue
                for key, ids in encoded.items():
                    if ids:
                        builders[key].add_document(ids, [len(ids)])
                docs += 1
                if docs % args.log_interval == 0:
                    elapsed = time.time() - start
                    bar.set_postfix(docs_per_s=f"{docs / elapsed:.0f}", mb_per_s=f"{bar.n / elapsed / 1e6:.1f}")
        finally:
            if pool is not None:
                pool.terminate()
    for key, builder in builders.items():
        builder.finalize(prefixes[key] + ".idx")
    elapsed = time.time() - start
    print(f"{docs} documents ({bad} bad lines skipped) in {elapsed:.1f} s: {docs / max(elapsed, 1e-9):.0f} docs/s, "
          f"{size / max(elapsed, 1e-9) / 1e6:.1f} MB/s -> {', '.join(p + '.{bin,idx}' for p in prefixes.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
