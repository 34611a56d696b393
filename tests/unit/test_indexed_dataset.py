"""The .bin/.idx format byte for byte, reading, merging, and clear errors on bad files."""

import struct

import numpy as np
import pytest

from megamoe.data.indexed_dataset import (IndexedDataset, IndexedDatasetBuilder, merge_datasets, optimal_dtype,
                                          write_index)


def build(prefix, docs, dtype=np.uint16):
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for doc in docs:
        b.add_item(doc)
        b.end_document()
    b.finalize(f"{prefix}.idx")


def test_golden_bytes_of_megatrons_example(tmp_path):
    # 3 documents [1,2,3] [4,5] [6,7,8,9] in uint16: 102-byte .idx, 18-byte .bin (design/megatron-facts.md)
    build(tmp_path / "d", [[1, 2, 3], [4, 5], [6, 7, 8, 9]])
    golden = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + bytes([8]) + struct.pack("<Q", 3) + struct.pack("<Q", 4)
              + struct.pack("<3i", 3, 2, 4) + struct.pack("<3q", 0, 6, 10) + struct.pack("<4q", 0, 1, 2, 3))
    assert (tmp_path / "d.idx").read_bytes() == golden and len(golden) == 102
    assert (tmp_path / "d.bin").read_bytes() == struct.pack("<9H", *range(1, 10))
    assert bytes.fromhex("4d4d4944494458 0000 0100000000000000 08 0300000000000000 0400000000000000"
                         .replace(" ", "")) == golden[:34]


def test_round_trip_and_partial_reads(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70000, size=rng.integers(1, 50)) for _ in range(40)]
    build(tmp_path / "d", docs, dtype=np.int32)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 40 and ds.dtype == np.int32
    for i, doc in enumerate(docs):
        assert ds[i].tolist() == doc.tolist()
    assert ds.get(3, 1, 2).tolist() == docs[3][1:3].tolist()
    assert ds.document_indices.tolist() == list(range(41))


def test_documents_of_several_sentences_and_merge(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "a.bin"), np.uint16)
    b.add_document([1, 2, 3, 4, 5], [2, 3])
    b.add_document([6], [1])
    b.finalize(str(tmp_path / "a.idx"))
    build(tmp_path / "b", [[7, 8], [9]])
    merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    m = IndexedDataset(str(tmp_path / "m"))
    assert [m[i].tolist() for i in range(len(m))] == [[1, 2], [3, 4, 5], [6], [7, 8], [9]]
    assert m.document_indices.tolist() == [0, 2, 3, 4, 5]


def test_dtype_selection():
    assert optimal_dtype(32000) == np.uint16 and optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32 and optimal_dtype(128256) == np.int32


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.idx does not exist"):
        IndexedDataset(str(tmp_path / "missing"))
    build(tmp_path / "d", [[1, 2, 3]])
    raw = (tmp_path / "d.idx").read_bytes()
    (tmp_path / "bad.bin").write_bytes((tmp_path / "d.bin").read_bytes())
    (tmp_path / "bad.idx").write_bytes(b"XXXXXXXXX" + raw[9:])
    with pytest.raises(ValueError, match="bad.idx is not a Megatron index"):
        IndexedDataset(str(tmp_path / "bad"))
    (tmp_path / "bad.idx").write_bytes(raw[:40])
    with pytest.raises(ValueError, match="bad.idx is truncated"):
        IndexedDataset(str(tmp_path / "bad"))
    (tmp_path / "bad.idx").write_bytes(raw)
    (tmp_path / "bad.bin").write_bytes(b"\x01")
    with pytest.raises(ValueError, match="bad.bin is truncated"):
        IndexedDataset(str(tmp_path / "bad"))


def test_token_ids_beyond_the_vocabulary(tmp_path):
    build(tmp_path / "d", [[1, 500]])
    IndexedDataset(str(tmp_path / "d")).check_vocab(501)
    with pytest.raises(ValueError, match="holds token id 500, but the tokenizer's vocabulary has 100 ids"):
        IndexedDataset(str(tmp_path / "d")).check_vocab(100)


def test_empty_index(tmp_path):
    (tmp_path / "e.bin").write_bytes(b"")
    write_index(str(tmp_path / "e.idx"), np.uint16, [], [0])
    assert len(IndexedDataset(str(tmp_path / "e"))) == 0


def test_merge_tool(tmp_path):
    import subprocess
    import sys

    build(tmp_path / "a", [[1, 2]])
    build(tmp_path / "b", [[3], [4, 5]])
    subprocess.run([sys.executable, "tools/merge_datasets.py", "--input", str(tmp_path / "a"), str(tmp_path / "b"),
                    "--output-prefix", str(tmp_path / "m")], check=True, capture_output=True)
    m = IndexedDataset(str(tmp_path / "m"))
    assert [m[i].tolist() for i in range(len(m))] == [[1, 2], [3], [4, 5]]


def test_large_files_are_probed_not_scanned(tmp_path):
    # 1000 tokens in range, with out-of-range ids spread through the file (as a mismatched tokenizer makes them)
    tokens = [7] * 1000
    for i in range(0, 1000, 50):
        tokens[i] = 900
    build(tmp_path / "d", [tokens])
    ds = IndexedDataset(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="holds token id 900"):  # probed: 8 windows of 16 tokens
        ds.check_vocab(500, full_scan_tokens=100, probes=8, probe_tokens=16)
    single = [7] * 1000
    single[500] = 900  # between the probe windows (starting at 0, 140, 281, 421, 562, ...)
    build(tmp_path / "e", [single])
    IndexedDataset(str(tmp_path / "e")).check_vocab(500, full_scan_tokens=100, probes=8, probe_tokens=16)
    with pytest.raises(ValueError, match="holds token id 900"):  # a full scan, under the size limit, sees it
        IndexedDataset(str(tmp_path / "e")).check_vocab(500)
