"""tools/plot_metrics.py: expert shares from the logged counts, the last record of a re-logged iteration wins,
PNG files written, clear errors for a missing or truncated file."""

import json

import pytest

from tools.plot_metrics import expert_shares, main, read_metrics


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


RECORDS = [
    {"split": "train", "iteration": 1, "lm loss": 7.0, "moe": {"1": {"tokens_per_expert": [3, 1, 0, 4]}}},
    {"split": "train", "iteration": 2, "lm loss": 6.0, "moe": {"1": {"tokens_per_expert": [2, 2, 2, 2]}}},
    {"split": "valid", "iteration": 2, "lm loss": 6.5},
    {"split": "train", "iteration": 2, "lm loss": 5.5, "moe": {"1": {"tokens_per_expert": [0, 0, 0, 8]}}},
]


def test_shares_and_resumed_iterations(tmp_path):
    _write(tmp_path / "metrics.jsonl", RECORDS)
    metrics = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["lm loss"] for r in metrics["train"]] == [7.0, 5.5]  # iteration 2 logged again after a resume
    assert expert_shares(metrics["train"]) == {1: ([1, 2], [[3 / 8, 1 / 8, 0.0, 4 / 8], [0.0, 0.0, 0.0, 1.0]])}


def test_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    _write(tmp_path / "metrics.jsonl", RECORDS)
    assert main(["--metrics", str(tmp_path / "metrics.jsonl"), "--output", str(tmp_path / "plots")]) == 0
    for name in ("loss.png", "expert_load.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="--metrics"):
        read_metrics(str(tmp_path / "absent.jsonl"))
    _write(tmp_path / "metrics.jsonl", RECORDS, tail='{"split": "tra')
    with pytest.raises(ValueError, match=r"metrics.jsonl:5 is not JSON"):
        read_metrics(str(tmp_path / "metrics.jsonl"))
