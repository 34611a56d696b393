"""GPT samples exactly as Megatron-Core builds them (design/megatron-facts.md, section 5.2).

For one split of an indexed dataset, with seed, sequence length s and a requested number of samples:
    epochs          the fewest such that epochs x tokens_per_epoch >= samples x s + 1
    document index  the split's documents tiled over the epochs, int32, shuffled by numpy RandomState(seed); when
                    the last epoch is needed for less than 80% of its samples, it is shuffled on its own
    sample index    [samples + 1, 2] rows (position in the document index, token offset): samples of s + 1
                    tokens, consecutive samples sharing one token (the last label is the next first input)
    shuffle index   a shuffled arange of the samples, from the same RandomState, after the document index
Sample i reads the tokens from row shuffle[i] to row shuffle[i] + 1 of the sample index; tokens = text[:-1],
labels = text[1:]. Indices are cached as .npy files named by a hash of their description, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from megamoe.data.indexed_dataset import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """'969,30,1' -> normalized fractions for train, valid, test (missing entries are 0)."""
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError as err:
        raise ValueError(f"--split {split!r} must be comma-separated numbers, e.g. 969,30,1") from err
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {split!r} needs 1 to 3 non-negative weights with a positive sum, e.g. 969,30,1")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def split_bounds(fractions: Sequence[float], num_elements: int) -> list[int]:
    """Megatron's book-ends: cumulative round(fraction x N), the overshoot taken off every later bound."""
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * float(num_elements))))
    overshoot = bounds[-1] - num_elements
    return [bounds[0]] + [b - overshoot for b in bounds[1:]]


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(documents, num_epochs).astype(np.int32)
        rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_epochs: int,
                       tokens_per_epoch: int, extra_token: int = 1) -> np.ndarray:
    """Rows (document-index position, token offset) where each sample starts.

    Megatron's helpers.cpp walks the documents consuming seq_length + 1 tokens per sample and starting the next
    sample on the last token consumed; so sample j starts at position j x seq_length of the stream of documents
    in document-index order, which is what this computes, vectorized: the document holding that position and
    the offset in it.
    """
    num_samples = (num_epochs * tokens_per_epoch - extra_token) // seq_length
    ends = np.cumsum(np.asarray(sizes, dtype=np.int64)[document_index])          # stream end of each entry
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    position = np.searchsorted(ends, starts, side="right")
    offset = starts - (ends[position] - np.asarray(sizes, dtype=np.int64)[document_index[position]])
    largest = max(len(document_index), int(np.max(sizes, initial=0)))  # positions and offsets stay below this
    dtype = np.int32 if largest < np.iinfo(np.int32).max else np.int64
    return np.stack([position, offset], axis=1).astype(dtype)


def build_shuffle_index(num_samples: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total:
        return first
    last = np.arange(num_samples, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


@dataclass(frozen=True)
class GPTDatasetConfig:
    """The flags that shape samples: --seq-length, --seed, --split, --eod-mask-loss, --reset-position-ids,
    --reset-attention-mask, --data-cache-path; plus the tokenizer's eod and pad ids."""

    seq_length: int
    seed: int = 1234
    split: str = "969,30,1"
    eod: int = 0
    pad: int = -1
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    create_attention_mask: bool = False
    cache_dir: str | None = None


class GPTDataset(torch.utils.data.Dataset):
    """One split of one indexed dataset, as Megatron-Core's GPTDataset, for `num_samples` samples.

    Args:
        indexed: the memory-mapped .bin/.idx.
        split_name: "train", "valid" or "test".
        num_samples: samples requested (Megatron: train_iters x global batch, ...).
        config: sample shape and masks.
        barrier: called between building the indices (only when build=True) and loading them, so that one
            rank builds and the others wait (default: no-op, everyone builds identically and atomically).
        build: whether this rank may build missing cached indices.
    """

    def __init__(self, indexed: IndexedDataset, split_name: str, num_samples: int, config: GPTDatasetConfig,
                 barrier: Callable[[], None] = lambda: None, build: bool = True) -> None:
        self.indexed, self.config, self.split_name = indexed, config, split_name
        fractions = parse_split(config.split)
        bounds = split_bounds(fractions, len(indexed.document_indices) - 1)
        which = SPLIT_NAMES.index(split_name)
        self.documents = np.arange(bounds[which], bounds[which + 1], dtype=np.int32)
        if len(self.documents) == 0:
            raise ValueError(f"--split {config.split} leaves no documents for the {split_name} split of "
                             f"{indexed.prefix}")
        self.num_samples = num_samples
        description = {"class": "GPTDataset", "dataset_path": indexed.prefix, "num_samples": num_samples,
                       "index_split": split_name, "random_seed": config.seed, "sequence_length": config.seq_length,
                       "split": config.split}
        self.description = json.dumps(description, sort_keys=True)
        digest = hashlib.md5(self.description.encode()).hexdigest()
        cache = config.cache_dir or os.path.join(os.path.dirname(os.path.abspath(indexed.prefix)), "cache",
                                                 "GPTDataset_indices")
        self.cache_dir, self.cache_name = cache, f"{digest}-GPTDataset-{split_name}"
        paths = {k: os.path.join(cache, f"{digest}-GPTDataset-{split_name}-{k}.npy")
                 for k in ("document_index", "sample_index", "shuffle_index")}
        if build and not all(os.path.isfile(p) for p in paths.values()):
            os.makedirs(cache, exist_ok=True)
            for key, array in zip(("document_index", "sample_index", "shuffle_index"), self._build()):
                tmp = f"{paths[key]}.{os.getpid()}.tmp.npy"
                np.save(tmp, array)
                os.replace(tmp, paths[key])  # atomic: readers see a whole file or none
        barrier()
        self.document_index, self.sample_index, self.shuffle_index = (np.load(paths[k], mmap_mode="r")
                                                                      for k in ("document_index", "sample_index",
                                                                                "shuffle_index"))

    def _build(self):
        sizes = np.asarray(self.indexed.sequence_lengths)
        seq = self.config.seq_length
        tokens_per_epoch = int(sizes[self.documents].sum())
        epochs = 1
        while epochs * tokens_per_epoch < self.num_samples * seq + 1:
            epochs += 1
        separate = False
        if epochs > 1:
            sans_final = ((epochs - 1) * tokens_per_epoch - 1) // seq
            per_epoch = (tokens_per_epoch - 1) // seq
            separate = self.num_samples - sans_final < int(0.80 * per_epoch)
        rng = np.random.RandomState(self.config.seed)
        document_index = build_document_index(self.documents, epochs, rng, separate)
        sample_index = build_sample_index(sizes, document_index, seq, epochs, tokens_per_epoch)
        total = sample_index.shape[0] - 1
        first = ((epochs - 1) * tokens_per_epoch - 1) // seq if separate else total
        return document_index, sample_index, build_shuffle_index(first, total, rng)

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def text(self, i: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample i (padded with the pad id if the data ran short)."""
        j = int(self.shuffle_index[i])
        (first, first_offset), (last, last_offset) = self.sample_index[j], self.sample_index[j + 1]
        docs = self.document_index
        if first == last:
            parts = [self.indexed.get(int(docs[first]), int(first_offset), int(last_offset - first_offset) + 1)]
        else:
            parts = [self.indexed.get(int(docs[first]), int(first_offset))]
            parts += [self.indexed.get(int(docs[k])) for k in range(first + 1, last)]
            parts.append(self.indexed.get(int(docs[last]), 0, int(last_offset) + 1))
        text = np.concatenate(parts).astype(np.int64)
        short = self.config.seq_length + 1 - len(text)
        return np.concatenate([text, np.full(short, self.config.pad, np.int64)]) if short > 0 else text

    def __getitem__(self, i: int) -> dict:
        text = torch.from_numpy(self.text(i))
        tokens, labels = text[:-1], text[1:]
        return dict(tokens=tokens, labels=labels, **masks(tokens, labels, self.config))


def masks(tokens: torch.Tensor, labels: torch.Tensor, c: GPTDatasetConfig) -> dict:
    """loss_mask, position_ids and (when asked) attention_mask for one sample, Megatron's way."""
    s = tokens.shape[0]
    loss_mask = torch.ones(s)
    if c.eod_mask_loss:
        loss_mask[tokens == c.eod] = 0.0
    loss_mask[labels == c.pad] = 0.0
    position_ids = torch.arange(s)
    out = dict(loss_mask=loss_mask)
    attention = torch.tril(torch.ones(s, s)).unsqueeze(0) if c.create_attention_mask or c.reset_attention_mask else None
    if c.reset_position_ids or c.reset_attention_mask:
        for eod in (tokens == c.eod).nonzero().flatten().tolist():
            if c.reset_attention_mask:
                attention[0, eod + 1:, :eod + 1] = 0  # later documents cannot see earlier ones
            if c.reset_position_ids:
                position_ids[eod + 1:] -= position_ids[eod + 1].clone()
    out["position_ids"] = position_ids
    if attention is not None:
        out["attention_mask"] = attention < 0.5  # True where masked
    return out


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy interleave: each sample goes to the dataset furthest behind its share."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.sum() <= 0 or (weights < 0).any():
        raise ValueError(f"--data-path weights {weights.tolist()} must be non-negative with a positive sum")
    weights = weights / weights.sum()
    taken = np.zeros(len(weights), dtype=np.int64)
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    for i in range(size):
        errors = weights * max(i, 1) - taken
        d = int(np.argmax(errors))  # the first index wins ties
        dataset_index[i], dataset_sample_index[i] = d, taken[d]
        taken[d] += 1
    return dataset_index, dataset_sample_index


class BlendedDataset(torch.utils.data.Dataset):
    """Samples from several datasets in the proportions of their weights (Megatron's BlendedDataset)."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float], size: int) -> None:
        self.datasets = list(datasets)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(weights, size)

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int):
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]


def blend_surplus(target: int, weight: float) -> int:
    """Samples to ask of one blended dataset: ceil(ceil(target x weight) x 1.005), Megatron's surplus."""
    import math

    return math.ceil(math.ceil(target * weight) * 1.005)


class PretrainingSampler(torch.utils.data.Sampler):
    """Megatron's pretraining sampler: data-parallel rank r takes [r mbs, (r+1) mbs) of every mbs x dp chunk of the
    sample stream, from consumed_samples on, so a resumed run continues exactly where it stopped."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, drop_last: bool = True) -> None:
        if consumed_samples >= total_samples:
            raise ValueError(f"no samples left: {consumed_samples} consumed of {total_samples}")
        self.total, self.consumed, self.mbs, self.rank, self.dp = (total_samples, consumed_samples,
                                                                    micro_batch_size, dp_rank, dp_size)
        self.drop_last = drop_last

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.mbs * self.dp)

    def __iter__(self):
        chunk = self.mbs * self.dp
        mine = slice(self.rank * self.mbs, (self.rank + 1) * self.mbs)
        for start in range(self.consumed, self.total - chunk + 1, chunk):
            yield list(range(start, start + chunk))[mine]
