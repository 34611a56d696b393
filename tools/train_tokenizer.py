"""Train a sentencepiece tokenizer on text files: python tools/train_tokenizer.py --input a.txt b.txt
--model-prefix out/tok --vocab-size 8000. Writes out/tok.model (for --tokenizer-model) and out/tok.vocab."""

import argparse
import os


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="text files, one sentence or paragraph per line")
    p.add_argument("--model-prefix", required=True)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="sample at most this many input lines")
    args = p.parse_args(argv)
    for path in args.input:
        if not os.path.isfile(path):
            raise SystemExit(f"error: --input {path} does not exist")
    import sentencepiece

    os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        input=args.input, model_prefix=args.model_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
        character_coverage=args.character_coverage, input_sentence_size=args.max_sentences,
        shuffle_input_sentence=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
        minloglevel=2)
    print(f"wrote {args.model_prefix}.model ({args.vocab_size} pieces)")


if __name__ == "__main__":
    main()
