"""Reading a sharded checkpoint: a directory written by ``torch.distributed.checkpoint`` (DCP), as
the training tools save it with ``train.fsdp.enabled=True`` (docs/fsdp_training.md).

A DCP directory holds one ``__<rank>_0.distcp`` file of tensor bytes per process that saved it
and a ``.metadata`` file: a pickle of DCP's dataclasses (global shape, dtype and file location of
every tensor). DCP reads it with ``pickle.load``, which would run code from a crafted file;
:class:`SafeShardedReader` reads it with an unpickler that only rebuilds those dataclasses,
sizes, dtypes and paths (:data:`METADATA_GLOBALS`), and refuses anything else with
:class:`~revvit_d2.utils.io.UnsafeCheckpointError`, like :func:`~revvit_d2.utils.io.read_checkpoint`
does for files. The tensor bytes are raw storage (no pickle); the tools store the non-tensor
state of a run in a separate small file read with ``read_checkpoint``.

:func:`read_sharded_tensors` reads the full (unsharded) tensors under one prefix, without a
process group, in one process: what ``tools/convert_checkpoint.py`` turns into one file.
"""
import os
import pickle
import warnings
from typing import Dict

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from .io import UnsafeCheckpointError

__all__ = ["METADATA_FILE", "METADATA_GLOBALS", "SafeShardedReader", "is_sharded_checkpoint",
           "read_sharded_metadata", "read_sharded_tensors"]

#: The file that makes a directory a DCP checkpoint (written last by ``dcp.save``).
METADATA_FILE = ".metadata"

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": ("BytesStorageMetadata", "ChunkStorageMetadata",
                                              "Metadata", "MetadataIndex", "StorageMeta",
                                              "TensorProperties", "TensorStorageMetadata",
                                              "_MEM_FORMAT_ENCODING"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
    "torch.serialization": ("_get_layout",),  # a layout by its name
    "torch": ("Size",),
    "pathlib": ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"),
    "collections": ("OrderedDict",),
}

#: ``(module, name)`` of every global a ``.metadata`` pickle may use (plus torch's dtypes).
METADATA_GLOBALS = frozenset((mod, name) for mod, names in _DCP_CLASSES.items() for name in names)


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP metadata; refuses any other global (it could run code)."""

    def __init__(self, f, path: str):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(self.path, f"{module}.{name}")


class SafeShardedReader(FileSystemReader):
    """DCP's ``FileSystemReader`` whose ``.metadata`` is read as data only (see the module
    docstring); ``allow_unsafe_pickle=True`` reads it with ``pickle.load``, as DCP does."""

    def __init__(self, path, allow_unsafe_pickle: bool = False, **kwargs):
        super().__init__(path, **kwargs)
        self.allow_unsafe_pickle = bool(allow_unsafe_pickle)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self.allow_unsafe_pickle:
            return super().read_metadata(*args, **kwargs)
        path = os.path.join(os.fspath(self.path), METADATA_FILE)
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(path, f"a {type(metadata).__name__} (not DCP metadata)")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def is_sharded_checkpoint(path) -> bool:
    """Whether `path` is a directory that ``dcp.save`` completed (it has the metadata file)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA_FILE))


def read_sharded_metadata(path, allow_unsafe_pickle: bool = False) -> Metadata:
    """The DCP metadata of checkpoint directory `path` (:class:`SafeShardedReader`)."""
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a sharded checkpoint (a directory with a "
                                f"{METADATA_FILE} file written by torch.distributed.checkpoint)")
    return SafeShardedReader(path, allow_unsafe_pickle).read_metadata()


def read_sharded_tensors(path, prefix: str = "model.",
                         allow_unsafe_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """The full tensors stored under `prefix` in sharded checkpoint `path`, keys without the
    prefix, on the CPU. One process, no process group; whatever number of processes saved it.
    Non-tensor entries are never read."""
    reader = SafeShardedReader(path, allow_unsafe_pickle)
    metadata = read_sharded_metadata(path, allow_unsafe_pickle)
    out = {fqn: torch.empty(meta.size, dtype=meta.properties.dtype)
           for fqn, meta in metadata.state_dict_metadata.items()
           if fqn.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    if not out:
        raise KeyError(f"sharded checkpoint {path} holds no tensor under {prefix!r}")
    with warnings.catch_warnings():  # "... assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(out, storage_reader=reader, no_dist=True)
    return {fqn[len(prefix):]: t for fqn, t in out.items()}
