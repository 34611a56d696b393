"""dist-mmap: a rank's shard alone (no .idx) gives exactly the samples the full index gives that rank."""

import os

import numpy as np

from megamoe.data.gpt_dataset import GPTDataset, GPTDatasetConfig, PretrainingSampler
from megamoe.data.rank_shard import RankShardDataset, shard_prefix, write_rank_shards
from tests.unit.test_gpt_dataset import corpus


def test_rank_shards_give_the_same_samples_without_the_index(tmp_path):
    ds, _ = corpus(tmp_path, num_docs=60)
    config = GPTDatasetConfig(seq_length=16, split="1", cache_dir=str(tmp_path / "cache"))
    full = GPTDataset(ds, "train", 50, config)
    mbs, dp = 2, 3
    expected = {r: [full.text(i).tolist() for batch in PretrainingSampler(len(full), 0, mbs, r, dp) for i in batch]
                for r in range(dp)}
    write_rank_shards(full, str(tmp_path / "shards"), "train", mbs, dp)
    os.remove(str(tmp_path / "c.idx"))  # the shard and the .bin are all a rank needs now
    for r in range(dp):
        shard = RankShardDataset(str(tmp_path / "c.bin"), np.uint16, shard_prefix(str(tmp_path / "shards"), "train",
                                                                                    r, dp, mbs), config)
        assert len(shard) == len(expected[r]) > 0
        assert [shard.text(k).tolist() for k in range(len(shard))] == expected[r]
        assert shard[0]["tokens"].tolist() == expected[r][0][:-1]


def test_shard_loader_resumes_like_the_full_loader(tmp_path):
    import torch

    from megamoe.data.builder import build_loader
    from megamoe.data.rank_shard import build_shard_loader

    ds, _ = corpus(tmp_path, num_docs=60)
    config = GPTDatasetConfig(seq_length=16, split="1", cache_dir=str(tmp_path / "cache"))
    full = GPTDataset(ds, "train", 50, config)
    write_rank_shards(full, str(tmp_path / "shards"), "train", 2, 2)
    shard = RankShardDataset(str(tmp_path / "c.bin"), np.uint16, shard_prefix(str(tmp_path / "shards"), "train",
                                                                                1, 2, 2), config)
    for consumed in (0, 8):
        a = [b["tokens"] for b in build_loader(full, consumed, 2, 1, 2, num_workers=0)]
        b = [b["tokens"] for b in build_shard_loader(shard, consumed, 2, 2, num_workers=0)]
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
