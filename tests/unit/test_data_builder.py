"""Data flags to datasets and loaders: --data-path forms, blends, per-split paths, mock data, resumable loaders."""

import numpy as np
import pytest
import torch

from megamoe.data.builder import (DataConfig, MockGPTDataset, build_datasets, build_loader, parse_data_path,
                                  split_sample_counts)
from megamoe.data.gpt_dataset import GPTDatasetConfig
from tests.unit.test_gpt_dataset import corpus


def test_data_path_forms():
    assert parse_data_path(["a"]) == [(1.0, "a")]
    assert parse_data_path(["0.3", "a", "0.7", "b"]) == [(0.3, "a"), (0.7, "b")]
    assert parse_data_path(["a", "b"]) == [(None, "a"), (None, "b")]
    with pytest.raises(ValueError, match="must be non-negative with a positive sum"):
        parse_data_path(["0", "a", "0", "b"])
    with pytest.raises(ValueError, match="no data: give --data-path"):
        DataConfig()


def test_sample_counts():
    assert split_sample_counts(train_iters=100, eval_interval=10, eval_iters=5, global_batch=8) == [800, 440, 40]


def test_blend_of_two_corpora_and_split(tmp_path):
    a, _ = corpus(tmp_path, seed=1, name="a")
    b, _ = corpus(tmp_path, seed=2, name="b")
    config = DataConfig(data_path=("0.75", str(tmp_path / "a"), "0.25", str(tmp_path / "b")), split="90,10,0",
                        seq_length=8, data_cache_path=str(tmp_path / "cache"))
    train, valid, test = build_datasets(config, 1000, 0, -1, [40, 8, 8])  # test has weight 0 in --split
    assert len(train) == 40 and len(valid) == 8 and test is None
    assert np.bincount(train.dataset_index, minlength=2).tolist() == [30, 10]
    assert train[0]["tokens"].shape == (8,)


def test_tokenizer_mismatch_is_caught(tmp_path):
    corpus(tmp_path, name="a")
    with pytest.raises(ValueError, match="made with another tokenizer"):
        build_datasets(DataConfig(data_path=(str(tmp_path / "a"),), seq_length=8,
                                  data_cache_path=str(tmp_path / "c")), 100, 0, -1, [4, 0, 0])


def test_mock_data_is_megatrons_pattern():
    ds = MockGPTDataset(vocab_size=50, eod=49, num_samples=3, config=GPTDatasetConfig(seq_length=16))
    first = int(ds.lengths[0])
    text = torch.cat([ds[0]["tokens"], ds[0]["labels"][-1:]]).tolist()
    expected = [((i + 1) % 50) if i < first - 1 else 49 for i in range(min(first, 17))]
    assert text[:len(expected)] == expected


def test_loader_resumes_exactly_with_workers(tmp_path):
    a, _ = corpus(tmp_path, name="a")
    train = build_datasets(DataConfig(data_path=(str(tmp_path / "a"),), split="1", seq_length=8,
                                      data_cache_path=str(tmp_path / "c")), 1000, 0, -1, [32, 0, 0])[0]
    full = [b["tokens"] for b in build_loader(train, 0, 2, dp_rank=1, dp_size=2, num_workers=2)]
    resumed = [b["tokens"] for b in build_loader(train, 8, 2, dp_rank=1, dp_size=2, num_workers=0)]
    assert len(full) == len(train) // 4 and all(torch.equal(x, y) for x, y in zip(full[2:], resumed))
    assert torch.equal(full[0][0], train[2]["tokens"])  # rank 1 of 2 takes samples 2, 3 of the first chunk
