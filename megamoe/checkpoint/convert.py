"""Convert Hugging Face checkpoints (config.json + safetensors, sharded or not) to megamoe checkpoints and back.

Tensors stream one megamoe tensor at a time: reading a Hugging Face tensor opens its safetensors file lazily, and
a megamoe checkpoint is read and written tensor by tensor (offline.py). A converted megamoe checkpoint holds
global tensors only, so pretrain_gpt.py --load takes it under any layout; it is iteration 0 with no optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from megamoe.checkpoint.hf import hf_config_from_model, model_config_from_dict, model_from_hf_config, tensor_mappings
from megamoe.checkpoint.offline import CheckpointReader, LazyTensor, write_checkpoint

SAFETENSORS_INDEX = "model.safetensors.index.json"
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class SafetensorsDir:
    """The tensors of a Hugging Face model directory, read one at a time."""

    def __init__(self, path: str) -> None:
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            raise FileNotFoundError(f"{config} does not exist: --load-dir must be a Hugging Face model directory")
        self.path, self.config = path, json.load(open(config))
        index = os.path.join(path, SAFETENSORS_INDEX)
        if os.path.isfile(index):
            self.files = json.load(open(index))["weight_map"]
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
                self.files = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{path} has no model.safetensors or {SAFETENSORS_INDEX} (only safetensors "
                                    f"weights are read: pickled .bin files are never loaded)")

    def _open(self, key: str):
        if key not in self.files:
            raise KeyError(f"{key} is not in {self.path}")
        return safe_open(os.path.join(self.path, self.files[key]), "pt")

    def read(self, key: str) -> torch.Tensor:
        with self._open(key) as f:
            return f.get_tensor(key)

    def shape_and_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        with self._open(key) as f:
            piece = f.get_slice(key)
            return tuple(piece.get_shape()), DTYPES[piece.get_dtype()]


def hf_to_megamoe(hf_dir: str, save_root: str, dtype: torch.dtype | None = None, seq_length: int | None = None,
                  progress: bool = True) -> tuple[str, object]:
    """Write the Hugging Face model in hf_dir as megamoe checkpoint iteration 0 under save_root.
    Returns (checkpoint directory, ModelConfig)."""
    source = SafetensorsDir(hf_dir)
    model = model_from_hf_config(source.config, seq_length)
    mappings = tensor_mappings(model)
    missing = [k for m in mappings for k in m.hf_keys if k not in source.files]
    if missing:
        raise ValueError(f"{hf_dir} lacks tensors its config implies, e.g. {missing[:3]}")
    bar = tqdm(total=len(mappings), desc="tensors", unit="tensor", disable=not progress)

    def lazy(m):
        shapes = [source.shape_and_dtype(k) for k in m.hf_keys]
        shape = tuple(m.to_megamoe([torch.empty(s, dtype=t, device="meta") for s, t in shapes]).shape)

        def load():
            bar.update(1)
            return m.to_megamoe([source.read(k) for k in m.hf_keys])
        return LazyTensor(shape, dtype or shapes[0][1], load)

    tensors = {f"model/{m.key}": lazy(m) for m in mappings}
    path = write_checkpoint(save_root, 0, tensors, {"model": dataclasses.asdict(model),
                                                    "converted_from": os.path.abspath(hf_dir)})
    bar.close()
    return path, model


def megamoe_to_hf(checkpoint: str, out_dir: str, dtype: torch.dtype | None = None,
                  max_shard_bytes: int = 5 * 2 ** 30, progress: bool = True) -> list[str]:
    """Write a megamoe checkpoint's model as a Hugging Face directory (config.json, safetensors shards of at
    most max_shard_bytes, and the index when there is more than one). Returns the files written."""
    reader = CheckpointReader(checkpoint)
    model = model_config_from_dict(reader.common["model"])
    mappings = tensor_mappings(model)
    saved = set(reader.keys("model/"))
    absent = [m.key for m in mappings if f"model/{m.key}" not in saved]
    if absent:
        raise ValueError(f"{reader.path} lacks {absent[:3]}: is it a megamoe checkpoint of this model?")
    out_dtype = dtype or reader.dtype(f"model/{mappings[0].key}")
    # Plan the shards from the shapes, so their names (model-0000k-of-0000n) are known before writing.
    shards, size = [[]], 0
    for m in mappings:
        nbytes = torch.Size(reader.shape(f"model/{m.key}")).numel() * out_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(m)
        size += nbytes
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map, total = {}, 0
    with tqdm(total=len(mappings), desc="tensors", unit="tensor", disable=not progress) as bar:
        for name, shard in zip(names, shards):
            tensors = {}
            for m in shard:
                for key, tensor in zip(m.hf_keys, m.to_hf(reader.read(f"model/{m.key}"))):
                    tensors[key] = tensor.to(out_dtype).contiguous()
                    weight_map[key] = name
                    total += tensors[key].numel() * out_dtype.itemsize
                bar.update(1)
            save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config_from_model(model, out_dtype), f, indent=2)
    if len(names) > 1:
        with open(os.path.join(tmp, SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return sorted(os.listdir(out_dir))
