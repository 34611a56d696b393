"""Preprocessing throughput (MB/s, docs/s) and GPT index build time on a generated corpus of about 200 MB.

The corpus is real text available offline: the Python standard library's source files, one document per
paragraph, repeated to the requested size. A sentencepiece tokenizer is trained on a sample first.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.data.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402
from megamoe.data.indexed_dataset import IndexedDataset  # noqa: E402
from tools.make_demo_corpus import stdlib_paragraphs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=200)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus, sample = os.path.join(tmp, "corpus.jsonl"), os.path.join(tmp, "sample.txt")
        paragraphs = list(stdlib_paragraphs())
        written, docs = 0, 0
        with open(corpus, "w") as f, open(sample, "w") as s:
            while written < args.size_mb * 1e6:
                for para in paragraphs:
                    line = json.dumps({"text": para}) + "\n"
                    f.write(line)
                    written += len(line)
                    docs += 1
                    if written < 5e6:
                        s.write(para.replace("\n", " ") + "\n")
                    if written >= args.size_mb * 1e6:
                        break
        print(f"corpus: {written / 1e6:.0f} MB, {docs:,} documents of the Python standard library's source")
        start = time.time()
        subprocess.run([sys.executable, os.path.join(ROOT, "tools/train_tokenizer.py"), "--input", sample,
                        "--model-prefix", os.path.join(tmp, "tok"), "--vocab-size", "8000"], check=True,
                       capture_output=True)
        print(f"sentencepiece training on 5 MB: {time.time() - start:.1f} s")
        for workers in args.workers:
            start = time.time()
            subprocess.run([sys.executable, os.path.join(ROOT, "tools/preprocess_data.py"), "--input", corpus,
                            "--output-prefix", os.path.join(tmp, "out"), "--tokenizer-type", "SentencePieceTokenizer",
                            "--tokenizer-model", os.path.join(tmp, "tok.model"), "--append-eod",
                            "--workers", str(workers)], check=True, capture_output=True)
            elapsed = time.time() - start
            print(f"preprocess, {workers} worker(s): {elapsed:.1f} s = {written / elapsed / 1e6:.1f} MB/s, "
                  f"{docs / elapsed:,.0f} docs/s")
        ds = IndexedDataset(os.path.join(tmp, "out_text_document"))
        tokens = int(ds.sequence_lengths.astype("int64").sum())
        start = time.time()
        data = GPTDataset(ds, "train", tokens // 4096, GPTDatasetConfig(seq_length=4096, split="1",
                                                                        cache_dir=os.path.join(tmp, "cache")))
        print(f"GPT indices for {len(data):,} samples of 4096 tokens ({tokens:,} tokens): {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
