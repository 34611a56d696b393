"""Merge indexed datasets into one: python tools/merge_datasets.py --input a_text_document b_text_document
--output-prefix merged_text_document (Megatron-LM's tool; documents keep their order, a's first)."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.data.indexed_dataset import merge_datasets  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes (without .bin/.idx)")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    merge_datasets(args.input, args.output_prefix)
    print(f"wrote {args.output_prefix}.bin/.idx from {len(args.input)} datasets")


if __name__ == "__main__":
    main()
