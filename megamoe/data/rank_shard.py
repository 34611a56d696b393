"""dist-mmap: each data-parallel rank maps only its own shard of the sample index, not the whole .idx.

A rank's samples are fixed by the pretraining sampler: rank r of dp reads [r mbs, (r+1) mbs) of every mbs x dp
chunk of the sample stream. write_rank_shards() walks the full indices once (where they fit, e.g. on a node
with memory to spare) and writes, per rank, the byte pieces of the .bin that make each of its samples:
    {prefix}.offsets.npy  int64 [samples + 1]   where each sample's pieces start in the two arrays below
    {prefix}.pointers.npy int64 [pieces]        byte offset of a piece in the .bin
    {prefix}.lengths.npy  int64 [pieces]        its length in tokens
RankShardDataset then needs only its own three files and the .bin: the same samples, in the same order, as the
full index gives that rank, with memory proportional to its samples rather than to the corpus' documents.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from megamoe.data.gpt_dataset import GPTDataset, GPTDatasetConfig, PretrainingSampler, masks

SHARD_ARRAYS = ("offsets", "pointers", "lengths")


def shard_prefix(cache_dir: str, name: str, dp_rank: int, dp_size: int, micro_batch_size: int) -> str:
    return os.path.join(cache_dir, f"{name}-dp{dp_rank}of{dp_size}-mbs{micro_batch_size}")


def write_rank_shards(dataset: GPTDataset, cache_dir: str, name: str, micro_batch_size: int, dp_size: int) -> None:
    """Write every rank's shard for this dataset (atomically, file by file)."""
    os.makedirs(cache_dir, exist_ok=True)
    indexed, itemsize = dataset.indexed, dataset.indexed.dtype.itemsize
    docs = dataset.document_index
    for rank in range(dp_size):
        sampler = PretrainingSampler(len(dataset), 0, micro_batch_size, rank, dp_size)
        offsets, pointers, lengths = [0], [], []
        for batch in sampler:
            for i in batch:
                j = int(dataset.shuffle_index[i])
                (first, first_offset), (last, last_offset) = dataset.sample_index[j], dataset.sample_index[j + 1]
                for k in range(int(first), int(last) + 1):
                    doc = int(docs[k])
                    start = int(first_offset) if k == first else 0
                    end = int(last_offset) + 1 if k == last else int(indexed.sequence_lengths[doc])
                    pointers.append(int(indexed.sequence_pointers[doc]) + start * itemsize)
                    lengths.append(end - start)
                offsets.append(len(pointers))
        prefix = shard_prefix(cache_dir, name, rank, dp_size, micro_batch_size)
        for key, values in zip(SHARD_ARRAYS, (offsets, pointers, lengths)):
            tmp = f"{prefix}.{key}.{os.getpid()}.tmp.npy"
            np.save(tmp, np.asarray(values, dtype=np.int64))
            os.replace(tmp, f"{prefix}.{key}.npy")


class RankShardDataset(torch.utils.data.Dataset):
    """This rank's samples from its shard files and the .bin alone. Item k is the rank's k-th sample: the k-th
    position the pretraining sampler gives it."""

    def __init__(self, bin_path: str, dtype, prefix: str, config: GPTDatasetConfig) -> None:
        arrays = {}
        for key in SHARD_ARRAYS:
            path = f"{prefix}.{key}.npy"
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} does not exist: write the rank shards first "
                                        f"(megamoe.data.rank_shard.write_rank_shards)")
            arrays[key] = np.load(path, mmap_mode="r")
        self.offsets, self.pointers, self.lengths = arrays["offsets"], arrays["pointers"], arrays["lengths"]
        self.dtype, self.config = np.dtype(dtype), config
        self._bin = np.memmap(bin_path, mode="r", dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def text(self, k: int) -> np.ndarray:
        parts = [self._bin[p:p + n * self.dtype.itemsize].view(self.dtype)
                 for p, n in zip(self.pointers[self.offsets[k]:self.offsets[k + 1]],
                                 self.lengths[self.offsets[k]:self.offsets[k + 1]])]
        text = np.concatenate(parts).astype(np.int64)
        short = self.config.seq_length + 1 - len(text)
        return np.concatenate([text, np.full(short, self.config.pad, np.int64)]) if short > 0 else text

    def __getitem__(self, k: int) -> dict:
        text = torch.from_numpy(self.text(k))
        return dict(tokens=text[:-1], labels=text[1:], **masks(text[:-1], text[1:], self.config))


def build_shard_loader(shard: RankShardDataset, consumed_samples: int, micro_batch_size: int, dp_size: int,
                       num_workers: int) -> torch.utils.data.DataLoader:
    """The rank's micro-batches from its shard, resuming after consumed_samples (global, as the full loader)."""
    first = consumed_samples // (micro_batch_size * dp_size) * micro_batch_size
    batches = [list(range(k, k + micro_batch_size)) for k in range(first, len(shard) - micro_batch_size + 1,
                                                                    micro_batch_size)]
    return torch.utils.data.DataLoader(shard, batch_sampler=batches, num_workers=num_workers)
