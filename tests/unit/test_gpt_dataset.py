"""Megatron's GPT sample construction, against an independent formulation and hand-worked examples."""

import numpy as np
import pytest
import torch

from megamoe.data.gpt_dataset import (BlendedDataset, GPTDataset, GPTDatasetConfig, PretrainingSampler,
                                      build_blending_indices, masks, parse_split, split_bounds)
from megamoe.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def corpus(tmp_path, num_docs=30, seed=0, name="c"):
    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), np.uint16)
    docs = []
    for _ in range(num_docs):
        doc = rng.integers(1, 1000, size=rng.integers(2, 40)).tolist() + [0]  # eod = 0
        docs.append(doc)
        b.add_item(doc)
        b.end_document()
    b.finalize(str(tmp_path / f"{name}.idx"))
    return IndexedDataset(str(tmp_path / name)), docs


def stream_reference(docs, documents, seed, num_samples, seq):
    """Independent: draw the shuffles from RandomState directly, lay the shuffled documents end to end, and cut
    the stream into windows of seq + 1 tokens that start every seq tokens."""
    rng = np.random.RandomState(seed)
    per_epoch = sum(len(docs[d]) for d in documents)
    epochs = 1
    while epochs * per_epoch < num_samples * seq + 1:
        epochs += 1
    order = np.tile(np.asarray(documents, dtype=np.int32), epochs)
    rng.shuffle(order)  # (single shuffle: the cases below keep the final epoch with the others)
    stream = [t for d in order for t in docs[d]]
    total = (epochs * per_epoch - 1) // seq
    windows = [stream[j * seq: j * seq + seq + 1] for j in range(total)]
    shuffle = np.arange(total, dtype=np.uint32)
    rng.shuffle(shuffle)
    return [windows[j] for j in shuffle]


@pytest.mark.parametrize("epochs_used, seq", [(0.5, 16), (1.0, 16), (1.9, 16), (0.3, 33)])
def test_samples_equal_the_stream_formulation(tmp_path, epochs_used, seq):
    # up to 1.9 epochs: the last epoch is used for more than 80% of its samples, so it is shuffled with the rest
    ds, docs = corpus(tmp_path)
    per_epoch = (sum(map(len, docs)) - 1) // seq
    num_samples = int(epochs_used * per_epoch)
    config = GPTDatasetConfig(seq_length=seq, seed=1234, split="100,0,0", cache_dir=str(tmp_path / "cache"))
    data = GPTDataset(ds, "train", num_samples, config)
    expected = stream_reference(docs, list(range(30)), 1234, num_samples, seq)
    assert len(data) == len(expected) >= num_samples
    for i in range(len(data)):
        assert data.text(i).tolist() == expected[i]
    sample = data[0]
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1]) and sample["tokens"].shape == (seq,)


def test_every_token_of_an_epoch_once_modulo_the_shared_token(tmp_path):
    ds, docs = corpus(tmp_path)
    data = GPTDataset(ds, "train", 10, GPTDatasetConfig(seq_length=16, split="1", cache_dir=str(tmp_path / "c")))
    ordered = [data.sample_index[j] for j in range(len(data) + 1)]
    stream = [t for d in data.document_index for t in docs[d]]
    text = []
    for j in range(len(data)):
        window = data.text(int(np.where(data.shuffle_index == j)[0][0])).tolist()
        text += window if j == 0 else window[1:]
    assert text == stream[:len(text)] and len(ordered) == len(data) + 1


def test_separate_final_epoch_and_seed_determinism(tmp_path):
    ds, _ = corpus(tmp_path)
    c = GPTDatasetConfig(seq_length=16, split="1", cache_dir=str(tmp_path / "c"))
    per_epoch = (int(np.asarray(ds.sequence_lengths).sum()) - 1) // 16
    a = GPTDataset(ds, "train", per_epoch + 3, c)  # the second epoch is barely used: shuffled on its own
    first_epoch = a.shuffle_index[:len(a) - (len(a) - per_epoch)]
    assert sorted(first_epoch.tolist())[:5] == list(range(5))
    assert set(a.shuffle_index[per_epoch:].tolist()) == set(range(per_epoch, len(a)))
    b = GPTDataset(ds, "train", per_epoch + 3, GPTDatasetConfig(seq_length=16, split="1", seed=1234,
                                                                 cache_dir=str(tmp_path / "d")))
    other = GPTDataset(ds, "train", per_epoch + 3, GPTDatasetConfig(seq_length=16, split="1", seed=7,
                                                                     cache_dir=str(tmp_path / "e")))
    assert np.array_equal(a.shuffle_index, b.shuffle_index) and not np.array_equal(a.shuffle_index,
                                                                                    other.shuffle_index)


def test_split_bounds_by_hand():
    assert split_bounds(parse_split("8,1,1"), 10) == [0, 8, 9, 10]
    assert split_bounds(parse_split("1,1,1"), 10) == [0, 4, 7, 10]  # 3.33 rounds to 3; the shortfall moves up
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    with pytest.raises(ValueError, match="--split '1,2,3,4' needs 1 to 3"):
        parse_split("1,2,3,4")
    with pytest.raises(ValueError, match="comma-separated numbers"):
        parse_split("a,b")


def test_splits_partition_the_documents(tmp_path):
    ds, _ = corpus(tmp_path)
    c = GPTDatasetConfig(seq_length=8, split="80,10,10", cache_dir=str(tmp_path / "c"))
    parts = [set(GPTDataset(ds, name, 5, c).documents.tolist()) for name in ("train", "valid", "test")]
    assert parts[0] | parts[1] | parts[2] == set(range(30)) and sum(map(len, parts)) == 30
    with pytest.raises(ValueError, match="leaves no documents for the test split"):
        GPTDataset(ds, "test", 5, GPTDatasetConfig(seq_length=8, split="1,0,0", cache_dir=str(tmp_path / "c")))


def test_blending_keeps_within_one_sample_of_the_weights():
    weights = [0.5, 0.3, 0.2]
    index, sample = build_blending_indices([5, 3, 2], 1000)
    for n in range(1, 1001):
        counts = np.bincount(index[:n], minlength=3)
        assert np.all(np.abs(counts - np.asarray(weights) * n) <= 1)
    for d in range(3):  # each dataset's samples are taken in order
        assert sample[index == d].tolist() == list(range(int((index == d).sum())))
    with pytest.raises(ValueError, match="must be non-negative with a positive sum"):
        build_blending_indices([0, 0], 3)


def test_blended_dataset_reads_the_right_samples():
    blended = BlendedDataset([list("abcdefgh"), list("12345678")], [0.75, 0.25], 8)
    assert [blended[i] for i in range(8)] == ["a", "1", "b", "c", "d", "2", "e", "f"]


def test_sampler_slices_and_resumes():
    full = [PretrainingSampler(40, 0, 2, r, 2) for r in range(2)]
    assert list(full[0])[:2] == [[0, 1], [4, 5]] and list(full[1])[:2] == [[2, 3], [6, 7]]
    for r in range(2):
        resumed = list(PretrainingSampler(40, 12, 2, r, 2))
        assert resumed == list(full[r])[3:]


def test_masks_by_hand():
    c = GPTDatasetConfig(seq_length=6, eod=0, pad=-1, eod_mask_loss=True, reset_position_ids=True,
                         reset_attention_mask=True)
    tokens = torch.tensor([5, 6, 0, 7, 8, 9])
    labels = torch.tensor([6, 0, 7, 8, 9, -1])
    out = masks(tokens, labels, c)
    assert out["loss_mask"].tolist() == [1, 1, 0, 1, 1, 0]        # eod input and pad label
    assert out["position_ids"].tolist() == [0, 1, 2, 0, 1, 2]
    assert out["attention_mask"][0, 4].tolist() == [True, True, True, False, False, True]  # own document only
    assert out["attention_mask"][0, 1].tolist() == [False, False, True, True, True, True]


def test_cached_indices_are_reused(tmp_path):
    ds, _ = corpus(tmp_path)
    c = GPTDatasetConfig(seq_length=8, split="1", cache_dir=str(tmp_path / "cache"))
    built = GPTDataset(ds, "train", 12, c)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 3 and all(f.endswith(".npy") and "-GPTDataset-train-" in f for f in files)
    loaded = GPTDataset(ds, "train", 12, c, build=False)
    assert np.array_equal(built.shuffle_index, loaded.shuffle_index)
