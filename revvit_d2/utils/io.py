"""The one atomic write and the one checkpoint-file reader of the project.

Every file revvit writes that a later run reads (checkpoints, ``last_checkpoint`` tags,
converted weights, dataset annotations) goes through :func:`atomic_write`: the data is written to
a temporary file in the target's directory, flushed to disk and renamed over the target, so a
process killed mid-write leaves either the old file or the new one, never a truncated one.

Every checkpoint file revvit reads goes through :func:`read_checkpoint`, which reads data and
never runs code from the file: ``torch.load(weights_only=True)`` with a short allowlist
(:data:`SAFE_GLOBALS`), and a numpy-only unpickler for detectron2's ``.pkl`` files. A file that
asks for anything else is refused (:class:`UnsafeCheckpointError`) unless the caller opts in
with ``allow_unsafe_pickle=True`` (see docs/security.md).
"""
import codecs
import collections
import contextlib
import os
import pickle
import re
import tempfile
import warnings
from typing import IO, Any, Iterator, List, Tuple, Union

import numpy as np
import torch

from .errors import UserError

__all__ = ["SAFE_GLOBALS", "TMP_PREFIX", "UnsafeCheckpointError", "atomic_write",
           "atomic_torch_save", "read_checkpoint"]

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


def _numpy_scalar_globals() -> List[Any]:
    """What a pickled numpy *scalar* needs (``numpy.float64(0.5)`` and the like): the scalar
    constructor under its numpy 2 and numpy 1 names, ``numpy.dtype`` and the numeric dtype
    classes. Rebuilding one makes a number from its bytes and runs no other code. Arrays are not
    on the list: no supported ``torch.save`` format stores one."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    found: List[Any] = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles a dtype's class as well
    if dtypes is not None:
        for name in ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32",
                     "UInt64", "Float16", "Float32", "Float64", "Long", "ULong", "LongLong",
                     "ULongLong", "Byte", "UByte", "Short", "UShort", "Int", "UInt"):
            cls = getattr(dtypes, f"{name}DType", None)
            if cls is not None and cls not in found:
                found.append(cls)
    return found


#: What :func:`read_checkpoint` allows beyond ``torch.load(weights_only=True)``'s own list
#: (tensors, ``torch.Size``, dtypes, ``OrderedDict``, numbers, strings, lists, tuples, dicts,
#: sets). The supported formats need nothing else: SlowFast ``.pyth`` files hold an epoch number,
#: state dicts and the config as a YAML string; mmpretrain / timm / MAE / DeiT files hold state
#: dicts and plain metadata; revvit's own checkpoints hold only plain types (tested). The one
#: entry: numpy scalars, which mmcv-era metadata (e.g. ``meta["hook_msgs"]["best_score"]``, a
#: metric computed with numpy) can hold.
SAFE_GLOBALS: Tuple[Any, ...] = tuple(_numpy_scalar_globals())

#: The globals a detectron2 / Caffe2 ``.pkl`` weight file needs: numpy arrays and scalars,
#: rebuilt from their bytes (:class:`_NumpyOnlyUnpickler`), under numpy 1 and 2 names.
_PKL_GLOBALS = {
    (mod, name): getattr(np._core.multiarray if hasattr(np, "_core") else np.core.multiarray,
                         name)
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
}
_PKL_GLOBALS[("numpy", "ndarray")] = np.ndarray
_PKL_GLOBALS[("numpy", "dtype")] = np.dtype
_PKL_GLOBALS[("_codecs", "encode")] = codecs.encode  # bytes pickled by Python 3, protocol 2
_PKL_GLOBALS[("collections", "OrderedDict")] = collections.OrderedDict

_OPT_IN = ("If you trust the file, opt in with allow_unsafe_pickle=True (train_net / run_video: "
           "train.allow_unsafe_pickle=True; eval_imagenet: eval.allow_unsafe_pickle=True; "
           "convert_checkpoint: --allow-unsafe-pickle), which executes code from the file; see "
           "docs/security.md")


class UnsafeCheckpointError(UserError):
    """A checkpoint file whose pickle asks for more than data (a global outside the allowlist):
    it could run code when loaded, so it was refused before any of its content was used."""

    def __init__(self, path: str, wants: str):
        self.path, self.wants = path, wants
        super().__init__(f"refusing to load {path}: its pickle asks for {wants}, which is "
                         f"outside the weights-only allowlist (unpickling it could run code). "
                         f"{_OPT_IN}")


def _refused_global(message: str) -> str:
    """What a weights-only load was refused for, from torch's UnpicklingError message."""
    m = re.search(r"GLOBAL (\S+) was not an allowed global", message)
    if m:
        return f"the global {m.group(1)}"
    m = re.search(r"but got <class '([^']+)'>", message)
    if m:
        return f"the class {m.group(1)}"
    m = re.search(r"WeightsUnpickler error: (.*)", message)
    reason = m.group(1).strip() if m else message.strip().splitlines()[-1]
    return f"something weights_only=True does not allow ({reason.rstrip('.')})"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and scalars inside plain containers; any other global raises
    :class:`pickle.UnpicklingError` before it is looked up."""

    def find_class(self, module: str, name: str):
        try:
            return _PKL_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"GLOBAL {module}.{name} was not an allowed global") from None


def _unsafe_load(path: str, mmap: bool) -> Any:
    warnings.warn(f"loading {path} with allow_unsafe_pickle=True: its pickle can execute code; "
                  f"only do this with files you trust", UserWarning, stacklevel=3)
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def read_checkpoint(path: PathLike, mmap: bool = False, allow_unsafe_pickle: bool = False) -> Any:
    """The object stored in checkpoint file `path`, loaded on the CPU, without running code.

    A ``torch.save`` file is read with ``torch.load(weights_only=True)`` plus
    :data:`SAFE_GLOBALS`; a ``.pkl`` file (detectron2 / Caffe2 model zoo: numpy arrays in
    dicts) with an unpickler that rebuilds numpy arrays and nothing else. A file that needs any
    other global is refused with :class:`UnsafeCheckpointError` (one line naming the file and
    the first global it asks for) before any of its content is used; there is no fallback.

    Args:
        path: the file.
        mmap: memory-map the tensors (``torch.load(mmap=True)``; ignored for ``.pkl``).
        allow_unsafe_pickle: load a file that needs more with plain pickle
            (``weights_only=False``) after a warning. This executes code from the file: only
            for files you trust.

    Raises:
        FileNotFoundError: `path` is not a file (one-line message).
        UnsafeCheckpointError: the file asks for a global outside the allowlist.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".pkl"):
        try:
            with open(path, "rb") as f:
                return _NumpyOnlyUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            if "was not an allowed global" not in str(e):
                raise  # a damaged file, not a refused one
            if not allow_unsafe_pickle:
                raise UnsafeCheckpointError(path, _refused_global(str(e))) from None
    else:
        try:
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise  # a damaged file, not a refused one
            if not allow_unsafe_pickle:
                raise UnsafeCheckpointError(path, _refused_global(str(e))) from None
    return _unsafe_load(path, mmap)
