"""Write a jsonl corpus of real text that every machine has offline: the Python standard library's source files,
one document per paragraph. python tools/make_demo_corpus.py --output runs/demo/corpus.jsonl --max-mb 20"""

import argparse
import glob
import json
import os
import sysconfig


def stdlib_paragraphs():
    """Paragraphs (blocks separated by blank lines) of the standard library's .py files, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        if "site-packages" in path or "test" in os.path.relpath(path, root).split(os.sep)[0]:
            continue
        try:
            text = open(path, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        for paragraph in text.split("\n\n"):
            if paragraph.strip():
                yield paragraph


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True)
    p.add_argument("--max-mb", type=float, default=20)
    p.add_argument("--text-sample", default=None, help="also write up to 5 MB of plain text (tokenizer training)")
    args = p.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    written = 0
    sample = open(args.text_sample, "w") if args.text_sample else None
    with open(args.output, "w") as out:
        for paragraph in stdlib_paragraphs():
            line = json.dumps({"text": paragraph}) + "\n"
            out.write(line)
            written += len(line)
            if sample is not None and written < 5e6:
                sample.write(paragraph.replace("\n", " ") + "\n")
            if written >= args.max_mb * 1e6:
                break
    if sample is not None:
        sample.close()
    print(f"wrote {written / 1e6:.1f} MB to {args.output}")


if __name__ == "__main__":
    main()
