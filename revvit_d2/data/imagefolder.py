"""ImageNet-style folders: the official eval preprocessing and a corruption-tolerant
``ImageFolder``.

* :func:`build_eval_transform` is the official (SlowFast / timm) single-crop test pipeline:
  resize the short side to ``int(input_size / crop_pct)`` (256 for 224), centre-crop
  ``input_size``, ``ToTensor`` (0-1), ``Normalize(mean, std)``.
* :class:`SafeImageFolder` + :func:`collate_skip_corrupt` never crash on an unreadable image: the
  sample is dropped from its batch and reported back (``batch["skipped"]``, with the reason) so
  the caller can log and count it, whatever the number of loader workers;
  :func:`skip_counts` / :func:`describe_skips` count distinct files per reason.

The built-in synthetic folder that the demo evaluates on is written by
:func:`revvit_d2.data.synthetic.imagenet.make_synthetic_imagefolder`.
"""
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode

from revvit_d2.data.images import READ_ERRORS, high_bit_to_8bit, read_failure_reason

logger = logging.getLogger(__name__)

__all__ = [
    "build_eval_transform",
    "eval_transform_from_cfg",
    "SafeImageFolder",
    "SkippedSample",
    "collate_skip_corrupt",
    "skip_counts",
    "describe_skips",
    "build_eval_loader",
]


# --------------------------------------------------------------------------------------------
# Official eval preprocessing
# --------------------------------------------------------------------------------------------
def _interpolation(name):
    if isinstance(name, InterpolationMode):
        return name
    try:
        return InterpolationMode(str(name).lower())
    except ValueError:
        raise ValueError(f"unknown interpolation {name!r}; one of "
                         f"{[m.value for m in InterpolationMode]}") from None


def build_eval_transform(input_size: Union[int, Sequence[int]], crop_pct: float = 0.875,
                         interpolation: str = "bicubic",
                         mean: Sequence[float] = (0.485, 0.456, 0.406),
                         std: Sequence[float] = (0.229, 0.224, 0.225)):
    """The official single-crop test preprocessing of a PIL RGB image.

    ``Resize(int(input_size / crop_pct))`` of the *short side* (keeping the aspect ratio) with
    `interpolation`, ``CenterCrop(input_size)``, ``ToTensor()`` (values 0-1) and
    ``Normalize(mean, std)`` with mean/std on the 0-1 scale. For 224 and 0.875: 256 then 224.

    Args:
        input_size: crop side, or ``(H, W)`` / ``(C, H, W)`` (square crops only).
    """
    if isinstance(input_size, (tuple, list)):
        hw = tuple(int(s) for s in input_size[-2:])
        if len(hw) == 2 and hw[0] != hw[1]:
            raise ValueError(f"only square eval crops are supported, got {tuple(input_size)}")
        input_size = hw[-1]
    input_size = int(input_size)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    resize = int(input_size / crop_pct)
    return T.Compose([
        T.Resize(resize, interpolation=_interpolation(interpolation)),
        T.CenterCrop(input_size),
        T.ToTensor(),
        T.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std]),
    ])


def eval_transform_from_cfg(pretrained_cfg: Mapping[str, Any]):
    """:func:`build_eval_transform` from a model's ``pretrained_cfg`` (``input_size``,
    ``crop_pct``, ``interpolation``, ``mean``, ``std``; mean/std must be on the 0-1 scale)."""
    scale = pretrained_cfg.get("value_scale", "0-1")
    if scale != "0-1":
        raise ValueError(f"pretrained_cfg mean/std have value_scale {scale!r}; expected '0-1'")
    return build_eval_transform(pretrained_cfg["input_size"],
                                crop_pct=pretrained_cfg.get("crop_pct", 0.875),
                                interpolation=pretrained_cfg.get("interpolation", "bicubic"),
                                mean=pretrained_cfg["mean"], std=pretrained_cfg["std"])


# --------------------------------------------------------------------------------------------
# Corruption-tolerant ImageFolder
# --------------------------------------------------------------------------------------------
class SkippedSample(NamedTuple):
    """Returned by :class:`SafeImageFolder` in place of a sample that could not be read.
    ``reason``: ``missing``, ``not a file``, ``empty file`` or ``unreadable``
    (:func:`revvit_d2.data.images.read_failure_reason`)."""

    path: str
    error: str
    reason: str = "unreadable"


def _check_imagefolder(root: Path):
    if not root.exists():
        raise FileNotFoundError(f"dataset directory not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"dataset path is not a directory: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"no class sub-folders in {root} (expected the ImageFolder layout "
                         f"{root}/<class>/<image>.JPEG)")
    return classes


def _pil_rgb_loader(path: str):
    """PIL ``convert("RGB")`` as torchvision's loader (no EXIF rotation: the official eval
    pipeline has none), with 16/32-bit grayscale scaled to 8 bits instead of saturating."""
    with open(path, "rb") as f:
        img = high_bit_to_8bit(Image.open(f))
        return img.convert("RGB")  # forces the full decode inside the try of __getitem__


class SafeImageFolder(ImageFolder):
    """``torchvision.datasets.ImageFolder`` that does not crash on an unreadable image.

    ``dataset[i]`` is ``(image, label)``, or a :class:`SkippedSample` when the file is missing,
    empty or cannot be decoded, or the transform raised; :func:`collate_skip_corrupt` drops
    those from the batch and reports them, which works with any number of loader workers.
    Grayscale, palette, CMYK, RGBA and 16-bit images load as RGB. :attr:`skipped_files`
    (``{path: reason}``) and :attr:`skipped` count the *distinct* files skipped when the
    dataset is read in this process (with loader workers, count the reported
    ``batch["skipped"]`` paths instead). A missing or empty directory raises at construction
    (``FileNotFoundError`` / ``NotADirectoryError`` / ``ValueError``) with a message naming the
    path.
    """

    def __init__(self, root, transform=None, target_transform=None):
        root = Path(os.path.expanduser(str(root)))
        _check_imagefolder(root)
        super().__init__(str(root), transform=transform, target_transform=target_transform,
                         loader=_pil_rgb_loader, allow_empty=True)
        if len(self.samples) == 0:
            raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) in the class folders "
                             f"of {root}")
        self.skipped_files: Dict[str, str] = {}

    @property
    def skipped(self) -> int:
        """Distinct files skipped so far in this process."""
        return len(self.skipped_files)

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
            if self.transform is not None:
                sample = self.transform(sample)
        except READ_ERRORS as e:
            reason = read_failure_reason(path, e)
            self.skipped_files.setdefault(path, reason)
            return SkippedSample(path, f"{type(e).__name__}: {e}", reason)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


def skip_counts(skipped: Iterable[SkippedSample]) -> Dict[str, str]:
    """``{path: reason}`` of the distinct files among `skipped` (first reason wins)."""
    out: Dict[str, str] = {}
    for s in skipped:
        out.setdefault(s.path, s.reason)
    return out


def describe_skips(reasons: Mapping[str, str]) -> str:
    """``"2 skipped: 1 unreadable, 1 empty file"`` (``"0 skipped"`` when none) from
    ``{path: reason}``."""
    if not reasons:
        return "0 skipped"
    counts = Counter(reasons.values())
    parts = ", ".join(f"{n} {r}" for r, n in sorted(counts.items(), key=lambda x: (-x[1], x[0])))
    return f"{len(reasons)} skipped: {parts}"


def collate_skip_corrupt(batch: List[Any]) -> Dict[str, Any]:
    """Collate ``(image, label)`` pairs, dropping :class:`SkippedSample` entries.

    Returns ``{"images": Tensor or None, "targets": Tensor or None, "skipped": [SkippedSample]}``
    (``None`` when every sample of the batch was skipped).
    """
    skipped = [b for b in batch if isinstance(b, SkippedSample)]
    good = [b for b in batch if not isinstance(b, SkippedSample)]
    if not good:
        return {"images": None, "targets": None, "skipped": skipped}
    images = torch.stack([g[0] for g in good])
    targets = torch.as_tensor([int(g[1]) for g in good], dtype=torch.long)
    return {"images": images, "targets": targets, "skipped": skipped}


def build_eval_loader(root: Union[str, os.PathLike, SafeImageFolder], transform,
                      batch_size: int = 64, num_workers: int = 2,
                      max_images: Optional[int] = None, pin_memory: bool = False):
    """An ordered ``DataLoader`` (collate :func:`collate_skip_corrupt`) over an ImageFolder.

    Args:
        root: a directory (a :class:`SafeImageFolder` is built over it) or an existing
            :class:`SafeImageFolder`, whose transform is then replaced by `transform`.
        max_images: evaluate an evenly spaced subset of this many images (all classes
            represented, deterministic) instead of the whole folder.

    Returns:
        ``(dataset, loader)``; `dataset` is the full :class:`SafeImageFolder`.
    """
    if isinstance(root, SafeImageFolder):
        dataset = root
        dataset.transform = transform
    else:
        dataset = SafeImageFolder(root, transform=transform)
    subset = dataset
    n = len(dataset)
    if max_images is not None:
        if int(max_images) <= 0:
            raise ValueError(f"max_images must be positive, got {max_images}")
        if int(max_images) < n:
            m = int(max_images)
            subset = Subset(dataset, [i * n // m for i in range(m)])
    workers = max(0, min(int(num_workers), os.cpu_count() or 1))
    loader = DataLoader(subset, batch_size=int(batch_size), shuffle=False, num_workers=workers,
                        collate_fn=collate_skip_corrupt, pin_memory=pin_memory,
                        persistent_workers=False)
    return dataset, loader
