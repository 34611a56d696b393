"""Tokenizers: sentencepiece round trip, GPT-2 byte-level BPE against an independent BPE, Null, bad input."""

import json
import subprocess
import sys

import pytest

from megamoe.data.tokenizers import GPT2BPETokenizer, NullTokenizer, build_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n"
        "Mixture-of-Experts models route each token to a few experts; 42 tokens, 3.14 experts.\n") * 20


def test_null_tokenizer():
    t = build_tokenizer("NullTokenizer", vocab_size=100)
    assert t.tokenize("5 7 99") == [5, 7, 99] and t.detokenize([1, 2]) == "1 2" and t.eod == 99
    assert NullTokenizer(100, eod_id=0).eod == 0


def test_sentencepiece_round_trip(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input", str(tmp_path / "corpus.txt"),
                    "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "300"], check=True, capture_output=True)
    t = build_tokenizer("Llama2Tokenizer", tokenizer_model=str(tmp_path / "tok.model"))
    assert t.vocab_size == 300 and t.eod == 2 and t.bos == 1
    for line in TEXT.splitlines()[:2]:
        ids = t.tokenize(line)
        assert ids[0] != t.bos  # current Megatron-Core: no BOS prepended
        assert t.detokenize(ids) == line


def naive_byte_bpe(text, merges, vocab):
    """An independent byte-level BPE: split on GPT-2's pattern, map bytes, then apply merges in rank order."""
    import regex
    from megamoe.data.tokenizers import GPT2_PATTERN, bytes_to_unicode

    table = bytes_to_unicode()
    out = []
    for piece in regex.findall(GPT2_PATTERN, text):
        symbols = [table[b] for b in piece.encode("utf-8")]
        for a, b in merges:  # rank order: applying each merge everywhere, in turn, is the same BPE
            i, merged = 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        out += [vocab[s] for s in symbols]
    return out


def test_gpt2_bpe_against_an_independent_bpe(tmp_path):
    from megamoe.data.tokenizers import bytes_to_unicode

    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("e", "r"), ("o", "x"), ("Ġ", "f"), ("Ġf", "ox"), ("x", "p")]
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    t = GPT2BPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for text in ["the fox and the other fox", "Ünïcödé — experts' 42 tokens\n\n  spaced"]:
        ids = t.tokenize(text)
        assert ids == naive_byte_bpe(text, merges, vocab)
        assert t.detokenize(ids) == text
    assert t.eod == vocab["<|endoftext|>"]


def test_bad_tokenizer_input(tmp_path):
    with pytest.raises(ValueError, match="unknown --tokenizer-type 'Bert'"):
        build_tokenizer("Bert")
    with pytest.raises(FileNotFoundError, match="--tokenizer-model .* does not exist"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="NullTokenizer needs --vocab-size"):
        build_tokenizer("NullTokenizer")
