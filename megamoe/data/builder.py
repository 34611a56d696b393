"""From Megatron-LM's data flags to per-split datasets and data-parallel loaders.

--data-path accepts one prefix, "w1 p1 w2 p2 ...", or "p1 p2 ..." (weights = dataset sizes); --train-data-path,
--valid-data-path and --test-data-path give each split its own blend (no --split then). Each blended dataset is
asked for ceil(ceil(target x weight) x 1.005) samples, as Megatron asks. Sample counts per split (Megatron):
train = train_iters x global batch; valid = (train_iters // eval_interval + 1) x eval_iters x global batch;
test = eval_iters x global batch. --mock-data needs no files.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import numpy as np
import torch

from megamoe.data.gpt_dataset import (SPLIT_NAMES, BlendedDataset, GPTDataset, GPTDatasetConfig, PretrainingSampler,
                                      blend_surplus, masks, parse_split)
from megamoe.data.indexed_dataset import IndexedDataset


def parse_data_path(values: list[str]) -> list[tuple[float | None, str]]:
    """[(weight or None, prefix)]: "p", "w1 p1 w2 p2" or "p1 p2" (None: weigh by size)."""
    if len(values) == 1:
        return [(1.0, values[0])]
    try:
        weights = [float(v) for v in values[0::2]]
    except ValueError:
        return [(None, v) for v in values]
    if len(values) % 2:
        raise ValueError(f"--data-path {' '.join(values)}: weights and prefixes must come in pairs")
    if sum(weights) <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"--data-path weights {weights} must be non-negative with a positive sum")
    return list(zip(weights, values[1::2]))


@dataclass(frozen=True)
class DataConfig:
    """The data flags (Megatron-LM's names)."""

    data_path: tuple[str, ...] = ()
    train_data_path: tuple[str, ...] = ()
    valid_data_path: tuple[str, ...] = ()
    test_data_path: tuple[str, ...] = ()
    mock_data: bool = False
    split: str = "969,30,1"
    seq_length: int = 1024
    seed: int = 1234
    data_cache_path: str | None = None
    num_workers: int = 2
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    dist_mmap: bool = False

    def __post_init__(self) -> None:
        per_split = any((self.train_data_path, self.valid_data_path, self.test_data_path))
        if not self.mock_data and not self.data_path and not per_split:
            raise ValueError("no data: give --data-path (or --train-data-path / --valid-data-path / "
                             "--test-data-path), or --mock-data")
        if self.data_path and per_split:
            raise ValueError("give either --data-path with --split, or per-split --*-data-path, not both")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.dist_mmap and (self.mock_data or len(self.data_path or self.train_data_path) != 1):
            raise ValueError("--dist-mmap shards the sample index of one dataset: give one --data-path prefix "
                             "(no blend, no --mock-data), or leave --dist-mmap out")

    def check_files(self) -> None:
        """Raise FileNotFoundError naming the flag when a .bin/.idx is missing (cheap: run before any collective)."""
        for flag, paths in (("--data-path", self.data_path), ("--train-data-path", self.train_data_path),
                            ("--valid-data-path", self.valid_data_path), ("--test-data-path", self.test_data_path)):
            for _, prefix in parse_data_path(list(paths)) if paths else []:
                for path in (prefix + ".bin", prefix + ".idx"):
                    if not os.path.isfile(path):
                        raise FileNotFoundError(f"{flag}: {path} does not exist; give the prefix of a .bin/.idx pair "
                                                f"made by tools/preprocess_data.py")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("data")
        for flag in ("--data-path", "--train-data-path", "--valid-data-path", "--test-data-path"):
            g.add_argument(flag, nargs="+", default=[])
        g.add_argument("--mock-data", action="store_true")
        g.add_argument("--split", default="969,30,1")
        g.add_argument("--data-cache-path", default=None)
        g.add_argument("--num-workers", type=int, default=2)
        g.add_argument("--eod-mask-loss", action="store_true")
        g.add_argument("--reset-position-ids", action="store_true")
        g.add_argument("--reset-attention-mask", action="store_true")
        g.add_argument("--dist-mmap", action="store_true",
                       help="each data-parallel rank maps only its shard of the sample index (megamoe.data.rank_shard)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DataConfig":
        return cls(tuple(args.data_path), tuple(args.train_data_path), tuple(args.valid_data_path),
                   tuple(args.test_data_path), args.mock_data, args.split, args.seq_length, args.seed,
                   args.data_cache_path, args.num_workers, args.eod_mask_loss, args.reset_position_ids,
                   args.reset_attention_mask, args.dist_mmap)


class MockGPTDataset(torch.utils.data.Dataset):
    """Megatron's --mock-data: 100,000 pseudo-documents of length < 4096 (RandomState(0)); document tokens are
    (arange(len - 1) + 1) % vocab followed by eod; samples are cut from them like real ones."""

    def __init__(self, vocab_size: int, eod: int, num_samples: int, config: GPTDatasetConfig) -> None:
        rng = np.random.RandomState(0)
        self.lengths = rng.randint(low=1, high=4096, size=100_000).astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])
        self.vocab, self.eod, self.config, self.num_samples = vocab_size, eod, config, num_samples

    def __len__(self) -> int:
        return self.num_samples

    def _token(self, positions: np.ndarray) -> np.ndarray:
        doc = np.searchsorted(self.starts, positions, side="right") - 1
        within = positions - self.starts[doc]
        last = within == self.lengths[doc] - 1
        return np.where(last, self.eod, (within + 1) % self.vocab)

    def __getitem__(self, i: int) -> dict:
        seq = self.config.seq_length
        text = torch.from_numpy(self._token(np.arange(i * seq, i * seq + seq + 1) % int(self.starts[-1])))
        return dict(tokens=text[:-1], labels=text[1:], **masks(text[:-1], text[1:], self.config))


def split_sample_counts(train_iters: int, eval_interval: int, eval_iters: int, global_batch: int) -> list[int]:
    """Megatron's samples per split (train, valid, test)."""
    return [train_iters * global_batch, (train_iters // eval_interval + 1) * eval_iters * global_batch,
            eval_iters * global_batch]


def build_datasets(config: DataConfig, vocab_size: int, eod: int, pad: int, counts: list[int],
                   barrier=lambda: None, build: bool = True) -> list[torch.utils.data.Dataset | None]:
    """Train, valid and test datasets (None where a split has no data or no samples are asked)."""
    sample_config = GPTDatasetConfig(config.seq_length, config.seed, config.split, eod, pad, config.eod_mask_loss,
                                     config.reset_position_ids, config.reset_attention_mask,
                                     cache_dir=config.data_cache_path)
    if config.mock_data and not config.data_path and not config.train_data_path:
        return [MockGPTDataset(vocab_size, eod, n, sample_config) if n else None for n in counts]
    out = []
    for which, (name, count) in enumerate(zip(SPLIT_NAMES, counts)):
        paths = config.data_path or (config.train_data_path, config.valid_data_path, config.test_data_path)[which]
        if not paths or not count or (config.data_path and parse_split(config.split)[which] == 0):
            out.append(None)  # a split with no data, no samples asked, or weight 0 in --split
            continue
        split = config.split if config.data_path else "1,0,0"
        blend = parse_data_path(list(paths))
        indexed = [IndexedDataset(prefix) for _, prefix in blend]
        for ds in indexed:
            ds.check_vocab(vocab_size)
        weights = [w if w is not None else float(len(ds)) for (w, _), ds in zip(blend, indexed)]
        weights = [w / sum(weights) for w in weights]
        cfg = GPTDatasetConfig(**{**sample_config.__dict__, "split": split})
        split_name = name if config.data_path else "train"  # a per-split path is used whole
        if len(indexed) == 1:
            out.append(GPTDataset(indexed[0], split_name, count, cfg, barrier, build))
            continue
        parts = [GPTDataset(ds, split_name, blend_surplus(count, w), cfg, barrier, build)
                 for ds, w in zip(indexed, weights)]
        out.append(BlendedDataset(parts, weights, count))
    return out


def build_loader(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 num_workers: int) -> torch.utils.data.DataLoader:
    """This data-parallel rank's micro-batches, in order, resuming after consumed_samples."""
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       persistent_workers=num_workers > 0)


def build_train_loader(config: DataConfig, dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int, barrier=lambda: None, build: bool = True) -> torch.utils.data.DataLoader:
    """The training micro-batches of this data-parallel rank: from the full sample index, or with --dist-mmap
    from this rank's shard of it (written once for every rank, beside the index cache, by the rank that builds)."""
    if not config.dist_mmap:
        return build_loader(dataset, consumed_samples, micro_batch_size, dp_rank, dp_size, config.num_workers)
    from megamoe.data.rank_shard import RankShardDataset, build_shard_loader, shard_prefix, write_rank_shards

    last = shard_prefix(dataset.cache_dir, dataset.cache_name, dp_size - 1, dp_size, micro_batch_size)
    if build and not os.path.isfile(last + ".lengths.npy"):  # the last file written
        write_rank_shards(dataset, dataset.cache_dir, dataset.cache_name, micro_batch_size, dp_size)
    barrier()
    shard = RankShardDataset(dataset.indexed.prefix + ".bin", dataset.indexed.dtype,
                             shard_prefix(dataset.cache_dir, dataset.cache_name, dp_rank, dp_size, micro_batch_size),
                             dataset.config)
    return build_shard_loader(shard, consumed_samples, micro_batch_size, dp_size, config.num_workers)
