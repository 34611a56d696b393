"""A DCP reader that never runs code from a checkpoint.

torch.distributed.checkpoint stores tensors with torch.save (read back with weights_only=True) but its .metadata
file is a plain pickle, which could name any callable. SafeFileSystemReader unpickles it with an allow-list of the
metadata classes DCP itself writes; anything else (os.system, builtins.eval, ...) is refused with a message.
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem, metadata



class UnsafeCheckpointError(ValueError):
    """The checkpoint's metadata asks to build an object that is not plain checkpoint metadata."""


def _layout(name: str) -> torch.layout:
    # What torch.serialization._get_layout does, for layout names only.
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.layout):
        raise UnsafeCheckpointError(f"unknown tensor layout {name!r} in checkpoint metadata")
    return value


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): _layout,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,
}
for _name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
              "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"):
    _ALLOWED[("torch.distributed.checkpoint.metadata", _name)] = getattr(metadata, _name)
for _name in dir(torch):  # dtypes and memory formats are torch module attributes
    _value = getattr(torch, _name, None)
    if isinstance(_value, (torch.dtype, torch.memory_format)):
        _ALLOWED[("torch", _name)] = _value


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        value = _ALLOWED.get((module, name))
        if value is None:
            raise UnsafeCheckpointError(f"refusing to load {module}.{name} from checkpoint metadata: only DCP's own "
                                        f"metadata classes are allowed (the file may be corrupt or malicious)")
        return value


def load_metadata(stream) -> metadata.Metadata:
    """Unpickle DCP metadata with the allow-list."""
    return _MetadataUnpickler(stream).load()


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose .metadata is read with the allow-list above."""

    def read_metadata(self, *args, **kwargs) -> metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            meta = load_metadata(io.BytesIO(f.read()))
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = metadata.StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta
