"""The one atomic write and the one checkpoint-file reader of the project.

Every file revvit writes that a later run reads (checkpoints, ``last_checkpoint`` tags,
converted weights, dataset annotations) goes through :func:`atomic_write`: the data is written to
a temporary file in the target's directory, flushed to disk and renamed over the target, so a
process killed mid-write leaves either the old file or the new one, never a truncated one.

Every checkpoint file revvit reads goes through :func:`read_checkpoint`.
"""
import contextlib
import logging
import os
import pickle
import tempfile
from typing import IO, Any, Iterator, Union

import torch

__all__ = ["TMP_PREFIX", "atomic_write", "atomic_torch_save", "read_checkpoint"]

logger = logging.getLogger(__name__)

#: Prefix of the temporary files of :func:`atomic_write` (a killed writer leaves one behind;
#: writers that own a directory may remove stale ones).
TMP_PREFIX = ".tmp_"

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: `path` appears whole, or not at all.

    The temporary file is removed when the block raises; the target is then left untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX,
                               suffix="_" + os.path.basename(path))
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def read_checkpoint(path: PathLike, mmap: bool = False) -> Any:
    """The object stored in checkpoint file `path`, loaded on the CPU.

    Raises FileNotFoundError (one-line message) for a missing file. The file is read with
    ``weights_only=True`` (tensors, numbers, strings and containers only); a file that holds
    other pickled Python objects is loaded in full only after a warning naming it.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        logger.warning("%s holds non-tensor Python objects; loading it with weights_only=False "
                       "(only do this with files you trust)", path)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
