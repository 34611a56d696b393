"""Tokenizers, chosen by Megatron-LM's --tokenizer-type, with Megatron's eod / bos / pad ids.

    NullTokenizer            text is space-separated ids; vocab --vocab-size; eod --null-tokenizer-eod-id
                             (default vocab - 1)
    SentencePieceTokenizer,  a sentencepiece model (--tokenizer-model); eod = the model's eos id. Like current
    Llama2Tokenizer          Megatron-Core, no BOS is prepended (Megatron before 2026-02 prepended one).
    GPT2BPETokenizer         byte-level BPE from --vocab-file (vocab.json) and --merge-file (merges.txt), with
                             GPT-2's regex pre-tokenization; eod = <|endoftext|>
    HuggingFaceTokenizer     any tokenizer `transformers` loads from --tokenizer-model (when installed)
"""

from __future__ import annotations

import abc
import json
import os
from functools import lru_cache

import regex

TOKENIZER_TYPES = ("NullTokenizer", "SentencePieceTokenizer", "Llama2Tokenizer", "GPTSentencePieceTokenizer",
                   "GPT2BPETokenizer", "HuggingFaceTokenizer")
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer(abc.ABC):
    """What the data pipeline needs: tokenize, detokenize, vocab_size, eod (and bos / pad where defined)."""

    vocab_size: int
    eod: int
    bos: int | None = None
    pad: int | None = None

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS or EOD added)."""

    @abc.abstractmethod
    def detokenize(self, ids: list[int]) -> str:
        """The text of `ids`."""


class NullTokenizer(Tokenizer):
    def __init__(self, vocab_size: int, eod_id: int | None = None, pad_id: int = -1) -> None:
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1 if eod_id is None else eod_id
        self.pad = pad_id

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def detokenize(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str) -> None:
        import sentencepiece

        _require(model_file, "--tokenizer-model")
        self.model = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.model.get_piece_size()
        self.eod, self.bos = self.model.eos_id(), self.model.bos_id()
        self.pad = self.model.pad_id()

    def tokenize(self, text: str) -> list[int]:
        return self.model.encode(text)

    def detokenize(self, ids: list[int]) -> str:
        return self.model.decode(list(ids))


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (so BPE never sees raw control bytes)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


class GPT2BPETokenizer(Tokenizer):
    def __init__(self, vocab_file: str, merge_file: str) -> None:
        _require(vocab_file, "--vocab-file")
        _require(merge_file, "--merge-file")
        with open(vocab_file, encoding="utf-8") as f:
            self.encoder: dict[str, int] = json.load(f)
        self.decoder = {v: k for k, v in self.encoder.items()}
        with open(merge_file, encoding="utf-8") as f:
            lines = [line for line in f.read().split("\n") if line and not line.startswith("#version")]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.pattern = regex.compile(GPT2_PATTERN)
        self.vocab_size = len(self.encoder)
        self.eod = self.encoder.get("<|endoftext|>", self.vocab_size - 1)
        self._cache: dict[str, list[str]] = {}

    def _bpe(self, word: str) -> list[str]:
        # Repeatedly merge the adjacent pair of lowest merge rank.
        if word in self._cache:
            return self._cache[word]
        parts = list(word)
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(mapped))
        return ids

    def detokenize(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


class HuggingFaceTokenizer(Tokenizer):
    def __init__(self, name_or_path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs the `transformers` package "
                             "(pip install transformers)") from err
        self.model = AutoTokenizer.from_pretrained(name_or_path)
        self.vocab_size = len(self.model)
        self.eod = self.model.eos_token_id
        self.bos, self.pad = self.model.bos_token_id, self.model.pad_token_id

    def tokenize(self, text: str) -> list[int]:
        return self.model.encode(text, add_special_tokens=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.model.decode(ids)


def _require(path: str | None, flag: str) -> None:
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist; give the tokenizer's file")


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None, vocab_file: str | None = None,
                    merge_file: str | None = None, vocab_size: int | None = None,
                    null_eod_id: int | None = None) -> Tokenizer:
    """The tokenizer for Megatron-LM's --tokenizer-type and its file flags."""
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size")
        return NullTokenizer(vocab_size, null_eod_id)
    if tokenizer_type in ("SentencePieceTokenizer", "Llama2Tokenizer", "GPTSentencePieceTokenizer"):
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")


def add_tokenizer_arguments(parser) -> None:
    g = parser.add_argument_group("tokenizer", "Megatron-LM's tokenizer flags")
    g.add_argument("--tokenizer-type", default=None, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--null-tokenizer-eod-id", type=int, default=None)


def tokenizer_from_args(args) -> Tokenizer:
    kind = args.tokenizer_type or ("NullTokenizer" if args.vocab_size else None)
    if kind is None:
        raise ValueError("give --tokenizer-type (with --tokenizer-model, or --vocab-file and --merge-file), or "
                         "--vocab-size for the NullTokenizer")
    return build_tokenizer(kind, args.tokenizer_model, args.vocab_file, args.merge_file, args.vocab_size,
                           args.null_tokenizer_eod_id)
