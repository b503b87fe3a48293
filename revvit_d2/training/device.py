"""The device and mixed-precision settings of a training tool's ``train`` section
(``train.device``, ``train.amp``, ``train.num_threads``), read the same way by every tool."""
from typing import Optional

import torch
from detectron2.utils import comm

from .cli import ToolError

__all__ = ["amp_dtype", "set_num_threads", "training_device"]


def training_device(train_cfg) -> torch.device:
    """``train.device`` (``auto``: CUDA when available, else the CPU); a CUDA device is this
    process's local GPU. ``cuda`` without CUDA is a :class:`ToolError`."""
    want = str(train_cfg.get("device", "auto"))
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ToolError("train.device is 'cuda' but CUDA is not available")
    if want == "cuda":
        return torch.device("cuda", comm.get_local_rank())
    return torch.device(want)


def amp_dtype(train_cfg) -> Optional[torch.dtype]:
    """``train.amp.dtype`` when ``train.amp.enabled``, else None (autocast is CUDA only)."""
    amp = train_cfg.get("amp") or {}
    if not amp.get("enabled", False):
        return None
    name = str(amp.get("dtype", "float16"))
    if name not in ("float16", "bfloat16"):
        raise ToolError(f"train.amp.dtype must be float16 or bfloat16, got {name!r}")
    return getattr(torch, name)


def set_num_threads(train_cfg) -> None:
    """``torch.set_num_threads(train.num_threads)`` when the key is set and not 0 (the CPU
    demos leave a core to the data-loader worker); unset: torch's default."""
    threads = train_cfg.get("num_threads")
    if threads:
        torch.set_num_threads(int(threads))
