"""Megatron's indexed dataset: a .bin of raw token ids and a .idx describing it, byte for byte.

.bin: every sequence's tokens, concatenated, in the index's dtype, native (little-endian) order, no header.
.idx (little-endian, no padding):
    offset  size  content
    0       9     magic b"MMIDIDX\\x00\\x00"
    9       8     u64 version = 1
    17      1     u8 dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    18      8     u64 N, the number of sequences
    26      8     u64 D, the length of the document index (documents + 1)
    34      4N    int32 sequence lengths (tokens)
    34+4N   8N    int64 sequence pointers: byte offset of each sequence in .bin
    34+12N  8D    int64 document index: sequence-index boundaries, from 0 to N
The reader memory-maps both files; nothing is loaded whole.
"""

from __future__ import annotations

import os
import struct
from typing import Iterable, Sequence

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
HEADER = 34


def optimal_dtype(vocab_size: int) -> type:
    """uint16 when every id fits (vocab < 65500, Megatron's rule), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def data_file(prefix: str) -> str:
    return prefix + ".bin"


def index_file(prefix: str) -> str:
    return prefix + ".idx"


class IndexedDatasetBuilder:
    """Writes a .bin as sequences arrive and the .idx at finalize (Megatron's builder semantics).

    add_item(tokens) appends one sequence; end_document() closes a document; add_document(tokens, lengths) writes
    a document of several sequences; add_index(prefix) appends another dataset.
    """

    def __init__(self, bin_path: str, dtype=np.int32) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self._file = open(bin_path, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        array = np.asarray(tokens, dtype=self.dtype)
        self._file.write(array.tobytes(order="C"))
        self.sequence_lengths.append(array.size)

    def end_document(self) -> None:
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens: Sequence[int] | np.ndarray, lengths: Sequence[int]) -> None:
        array = np.asarray(tokens, dtype=self.dtype)
        if sum(lengths) != array.size:
            raise ValueError(f"document lengths {list(lengths)} do not add up to its {array.size} tokens")
        self._file.write(array.tobytes(order="C"))
        self.sequence_lengths.extend(int(n) for n in lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def add_index(self, prefix: str) -> None:
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{index_file(prefix)} holds {other.dtype}, this dataset {self.dtype}")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(other.sequence_lengths.tolist())
        self.document_indices.extend((other.document_indices[1:] + offset).tolist())
        with open(data_file(prefix), "rb") as f:
            while chunk := f.read(1 << 24):
                self._file.write(chunk)

    def finalize(self, idx_path: str) -> None:
        self._file.close()
        write_index(idx_path, self.dtype, self.sequence_lengths, self.document_indices)


def write_index(idx_path: str, dtype, sequence_lengths: Sequence[int], document_indices: Sequence[int]) -> None:
    """Write an .idx for sequences of these lengths (pointers follow from the lengths and the dtype)."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    docs = np.asarray(document_indices, dtype=np.int64)
    tmp = idx_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", CODE_OF[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(docs)))
        f.write(lengths.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(docs.astype("<i8").tobytes())
    os.replace(tmp, idx_path)  # atomic: a reader never sees half an index


class IndexedDataset:
    """Read-only, memory-mapped view of a prefix's .bin/.idx.

    ds[i] is sequence i (a numpy array); ds.get(i, offset, length) a part of it; sequence_lengths,
    sequence_pointers and document_indices are the index arrays (memory-mapped).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        idx, bin_ = index_file(prefix), data_file(prefix)
        for path in (idx, bin_):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} does not exist: --data-path takes the prefix of a .bin/.idx pair "
                                        f"made by tools/preprocess_data.py (e.g. my-corpus_text_document)")
        size = os.path.getsize(idx)
        with open(idx, "rb") as f:
            header = f.read(HEADER)
        if len(header) < HEADER or header[:9] != MAGIC:
            raise ValueError(f"{idx} is not a Megatron index (bad magic {header[:9]!r}); rebuild it with "
                             f"tools/preprocess_data.py")
        version, code, n, d = struct.unpack("<QBQQ", header[9:])
        if version != VERSION:
            raise ValueError(f"{idx} has index version {version}, only {VERSION} is supported")
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx} has unknown dtype code {code}")
        expected = HEADER + 12 * n + 8 * d
        if size < expected:
            raise ValueError(f"{idx} is truncated: {size} bytes, its header promises {expected}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        index = np.memmap(idx, mode="r", dtype=np.uint8)
        self.sequence_lengths = index[HEADER:HEADER + 4 * n].view("<i4")
        self.sequence_pointers = index[HEADER + 4 * n:HEADER + 12 * n].view("<i8")
        self.document_indices = index[HEADER + 12 * n:HEADER + 12 * n + 8 * d].view("<i8")
        needed = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if n else 0
        if os.path.getsize(bin_) < needed:
            raise ValueError(f"{bin_} is truncated: {os.path.getsize(bin_)} bytes, the index needs {needed}")
        self._bin = np.memmap(bin_, mode="r", dtype=np.uint8) if needed else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i."""
        total = int(self.sequence_lengths[i])
        length = total - offset if length is None else length
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return self._bin[start:start + length * self.dtype.itemsize].view(self.dtype)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def check_vocab(self, vocab_size: int, full_scan_tokens: int = 2 ** 28, probes: int = 64,
                    probe_tokens: int = 2 ** 18) -> None:
        """Raise if a token id is outside [0, vocab_size): the data was made with another tokenizer.

        Files of up to full_scan_tokens tokens are scanned whole; larger ones (terabyte corpora, checked by every
        rank at start-up) through `probes` evenly spaced windows of probe_tokens tokens: a tokenizer mismatch puts
        out-of-range ids everywhere, so the windows find it without reading the corpus."""
        if len(self) == 0:
            return
        tokens = self._bin.view(self.dtype)
        if tokens.size > full_scan_tokens:
            starts = np.linspace(0, tokens.size - probe_tokens, probes).astype(np.int64)
            tokens = np.concatenate([tokens[a:a + probe_tokens] for a in starts])
        top = int(tokens.max()) if tokens.size else 0
        if top >= vocab_size or (tokens.size and int(tokens.min()) < 0):
            raise ValueError(f"{data_file(self.prefix)} holds token id {top}, but the tokenizer's vocabulary has "
                             f"{vocab_size} ids: the data was made with another tokenizer (--tokenizer-type / "
                             f"--tokenizer-model)")


def merge_datasets(prefixes: Iterable[str], output_prefix: str) -> None:
    """Concatenate several prefixes into one (tools/merge_datasets.py)."""
    prefixes = list(prefixes)
    builder = IndexedDatasetBuilder(data_file(output_prefix), IndexedDataset(prefixes[0]).dtype)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(index_file(output_prefix))
