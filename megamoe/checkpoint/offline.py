"""Whole tensors of a checkpoint in one process, without a model or a process group: what conversion tools use
(also from one rank of a running job: nothing here is a collective).

CheckpointReader reads one global tensor at a time (DCP reads only the pieces it needs), and write_checkpoint
writes tensors that are produced one at a time as DCP writes them (LazyTensor), so a conversion holds at most a
few tensors in memory, never the model.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from megamoe.checkpoint.checkpointer import COMMON, checkpoint_dir, is_complete, publish, read_state, read_tracker, \
    write_state
from megamoe.checkpoint.safe_reader import load_metadata


class CheckpointReader:
    """A megamoe checkpoint directory (iter_NNNNNNN/) or its root (the tracker's iteration)."""

    def __init__(self, path: str) -> None:
        if not is_complete(path):
            iteration = read_tracker(path)
            if iteration is None:
                raise FileNotFoundError(f"{path} is neither a megamoe checkpoint (iter_NNNNNNN/ with .metadata and "
                                        f"{COMMON}) nor a --save directory with a tracker")
            path = checkpoint_dir(path, iteration)
        self.path = path
        self.common = json.load(open(os.path.join(path, COMMON)))
        with open(os.path.join(path, ".metadata"), "rb") as f:
            meta = load_metadata(f)
        self._tensors = {k: v for k, v in meta.state_dict_metadata.items() if hasattr(v, "size")}

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self._tensors if k.startswith(prefix))

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].properties.dtype

    def read(self, key: str) -> torch.Tensor:
        """The whole global tensor `key`."""
        if key not in self._tensors:
            raise KeyError(f"{key} is not in checkpoint {self.path}")
        state = {key: torch.empty(self.shape(key), dtype=self.dtype(key))}
        read_state(state, self.path, single_process=True)
        return state[key]


class LazyTensor:
    """A whole tensor for write_checkpoint, made by `load()` only when DCP writes it."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, load: Callable[[], torch.Tensor]) -> None:
        self.shape, self.dtype, self.load = torch.Size(shape), dtype, load

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        zeros = torch.Size([0] * len(self.shape))
        return [WriteItem(index=MetadataIndex(fqn, zeros), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(zeros, self.shape),
                                                      properties=TensorProperties(dtype=self.dtype), size=self.shape))]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        tensor = self.load().to(self.dtype).contiguous()
        if tensor.shape != self.shape:
            raise ValueError(f"{index.fqn}: made a tensor of shape {tuple(tensor.shape)}, expected {tuple(self.shape)}")
        return tensor


def write_checkpoint(root: str, iteration: int, tensors: dict[str, LazyTensor], common: dict) -> str:
    """Write a model-only checkpoint (keys model/<name>) that pretrain_gpt.py --load takes under any layout."""
    tmp = checkpoint_dir(root, iteration) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_state(dict(tensors), tmp, single_process=True)
    record = {"consumed_samples": 0, "parallel": None, "optimizer": {"iteration": 0, "skipped_iterations": 0,
                                                                      "scaler": None},
              "saved_optim": False, "saved_main": False, "saved_rng": False, **common}
    return publish(root, iteration, record)
