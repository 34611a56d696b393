"""tools/preprocess_data.py on a jsonl made here: documents, eod placement, worker-independent bytes, bad lines."""

import json
import subprocess
import sys

from megamoe.data.indexed_dataset import IndexedDataset


def run(tmp_path, lines, *extra):
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    return subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(tmp_path / "in.jsonl"),
                           "--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "NullTokenizer",
                           "--vocab-size", "1000", *extra], capture_output=True, text=True)


def test_documents_and_eod(tmp_path):
    docs = [{"text": "1 2 3"}, {"text": ""}, {"text": "4 5"}]
    proc = run(tmp_path, [json.dumps(d) for d in docs], "--append-eod", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 3, 999], [4, 5, 999]]  # empty doc skipped
    assert ds.document_indices.tolist() == [0, 1, 2] and ds.dtype.name == "uint16"


def test_one_and_two_workers_write_identical_bytes(tmp_path):
    lines = [json.dumps({"text": " ".join(str((i * 7 + j) % 997) for j in range(i % 13 + 1))}) for i in range(500)]
    outputs = []
    for workers in ("1", "2"):
        proc = run(tmp_path, lines, "--append-eod", "--workers", workers)
        assert proc.returncode == 0, proc.stderr
        outputs.append(((tmp_path / "out_text_document.bin").read_bytes(),
                        (tmp_path / "out_text_document.idx").read_bytes()))
    assert outputs[0] == outputs[1]


def test_bad_lines_stop_with_the_line_number_or_are_skipped(tmp_path):
    lines = [json.dumps({"text": "1 2"}), "{not json", json.dumps({"body": "3"})]
    proc = run(tmp_path, lines, "--workers", "1")
    assert proc.returncode == 1 and "line 2: JSONDecodeError" in proc.stderr
    proc = run(tmp_path, lines, "--workers", "2", "--skip-bad-lines")
    assert proc.returncode == 0 and "2 bad lines skipped" in proc.stdout
    assert len(IndexedDataset(str(tmp_path / "out_text_document"))) == 1
