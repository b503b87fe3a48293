"""ImageNet-style folders: a built-in synthetic one, the official eval preprocessing, and a
corruption-tolerant ``ImageFolder``.

* :func:`make_synthetic_imagefolder` writes a small deterministic ``root/{train,val}/<class>/*.JPEG``
  folder whose classes are *shapes* (circle, square, triangle, ...) drawn at a random position,
  scale and colour on images of varied, mostly non-square sizes. It is what the built-in demo
  evaluates on, since no real data can be downloaded here.
* :func:`build_eval_transform` is the official (SlowFast / timm) single-crop test pipeline:
  resize the short side to ``int(input_size / crop_pct)`` (256 for 224), centre-crop
  ``input_size``, ``ToTensor`` (0-1), ``Normalize(mean, std)``.
* :class:`SafeImageFolder` + :func:`collate_skip_corrupt` never crash on an unreadable image: the
  sample is dropped from its batch and reported back (``batch["skipped"]``) so the caller can log
  and count it, whatever the number of loader workers.
"""
import logging
import math
import os
import random
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .generated import generate_once

logger = logging.getLogger(__name__)

__all__ = [
    "SHAPES",
    "default_datasets_root",
    "default_synthetic_root",
    "make_synthetic_imagefolder",
    "build_eval_transform",
    "eval_transform_from_cfg",
    "SafeImageFolder",
    "SkippedSample",
    "collate_skip_corrupt",
    "build_eval_loader",
]

# Class folders sort (as ImageFolder sorts them) in this order, so folder i is label i.
SHAPES = ("circle", "square", "triangle", "cross", "ring", "stripes", "checker", "star",
          "crescent", "dots")
_FORMAT_VERSION = 1


def default_datasets_root() -> Path:
    """``$REVVIT_DATASETS``, or ``./datasets`` (relative to the current directory)."""
    return Path(os.environ.get("REVVIT_DATASETS", "datasets"))


def default_synthetic_root() -> Path:
    """Where the built-in synthetic ImageNet-layout folder lives (``<datasets>/imagenet_synthetic``)."""
    return default_datasets_root() / "imagenet_synthetic"


# --------------------------------------------------------------------------------------------
# Synthetic folder
# --------------------------------------------------------------------------------------------
def _class_dir(index: int) -> str:
    return f"{index:02d}_{SHAPES[index]}"


def _colour(rng: random.Random) -> Tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _contrasting_pair(rng: random.Random):
    bg = _colour(rng)
    while True:
        fg = _colour(rng)
        if sum(abs(a - b) for a, b in zip(fg, bg)) >= 200:
            return bg, fg


def _regular_polygon(cx, cy, r, n, phase):
    return [(cx + r * math.cos(phase + 2 * math.pi * k / n),
             cy + r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, fg, bg, rng: random.Random):
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fg)
    elif shape == "square":
        draw.rectangle(box, fill=fg)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy, r, 3, -math.pi / 2), fill=fg)
    elif shape == "cross":
        t = r * rng.uniform(0.25, 0.4)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fg)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fg)
    elif shape == "ring":
        draw.ellipse(box, fill=fg)
        inner = r * rng.uniform(0.45, 0.65)
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=bg)
    elif shape == "stripes":
        n = rng.randint(3, 5)
        step = 2 * r / (2 * n - 1)
        for k in range(n):
            y0 = cy - r + 2 * k * step
            draw.rectangle([cx - r, y0, cx + r, y0 + step], fill=fg)
    elif shape == "checker":
        n = rng.choice((3, 4))
        step = 2 * r / n
        for i in range(n):
            for j in range(n):
                if (i + j) % 2 == 0:
                    x0, y0 = cx - r + i * step, cy - r + j * step
                    draw.rectangle([x0, y0, x0 + step, y0 + step], fill=fg)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            a = -math.pi / 2 + math.pi * k / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        draw.polygon(pts, fill=fg)
    elif shape == "crescent":
        draw.ellipse(box, fill=fg)
        off = r * rng.uniform(0.45, 0.6)
        a = rng.uniform(0, 2 * math.pi)
        ox, oy = cx + off * math.cos(a), cy + off * math.sin(a)
        draw.ellipse([ox - r, oy - r, ox + r, oy + r], fill=bg)
    elif shape == "dots":
        n = 3
        step = 2 * r / n
        dot = step * 0.3
        for i in range(n):
            for j in range(n):
                x, y = cx - r + (i + 0.5) * step, cy - r + (j + 0.5) * step
                draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=fg)
    else:  # pragma: no cover - SHAPES and this function are kept in sync
        raise ValueError(shape)


def _render(shape: str, rng: random.Random, size_range: Tuple[int, int]):
    from PIL import Image, ImageDraw

    lo, hi = size_range
    w, h = rng.randint(lo, hi), rng.randint(lo, hi)
    bg, fg = _contrasting_pair(rng)
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    short = min(w, h)
    r = short * rng.uniform(0.18, 0.36)
    cx = rng.uniform(r + 1, w - r - 1)
    cy = rng.uniform(r + 1, h - r - 1)
    # A faint distractor line so that images are not a lone shape on a flat background.
    line = tuple(min(255, max(0, c + rng.randint(-40, 40))) for c in bg)
    draw.line([(rng.uniform(0, w), rng.uniform(0, h)), (rng.uniform(0, w), rng.uniform(0, h))],
              fill=line, width=2)
    _draw_shape(draw, shape, cx, cy, r, fg, bg, rng)
    return img


def make_synthetic_imagefolder(root: Union[str, os.PathLike], num_classes: int = 10,
                               train_per_class: int = 20, val_per_class: int = 20,
                               image_size: Tuple[int, int] = (72, 128), seed: int = 0,
                               quality: int = 90) -> Path:
    """Write (once) a small deterministic ImageNet-layout folder of shape classes.

    Layout: ``root/{train,val}/<NN_shape>/syn_<split>_<NN>_<iiii>.JPEG``; class ``NN`` is label
    ``NN`` under ``torchvision.datasets.ImageFolder``. Images are RGB JPEGs whose width and height
    are drawn independently from ``image_size`` (inclusive range); the class is the shape, drawn
    with a random position, scale and contrasting colours.

    Idempotent and safe across processes (:func:`revvit_d2.data.generated.generate_once`): a
    ``.complete`` marker holding the parameters is written last, under a file lock. If it exists
    with the same parameters nothing is done; otherwise (other parameters, or an interrupted
    earlier run, recognised by its ``.in_progress`` marker) ``train/`` and ``val/`` are rewritten
    from scratch. A folder holding ``train/`` or ``val/`` without either marker was not made here
    and is left alone (``FileExistsError``).

    Returns:
        ``Path(root)``.
    """
    from PIL import Image  # noqa: F401  (fail early if PIL is missing)

    root = Path(root)
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    lo, hi = int(image_size[0]), int(image_size[1])
    if not 16 <= lo <= hi:
        raise ValueError(f"image_size must be (min, max) with 16 <= min <= max, got {image_size}")
    params = dict(version=_FORMAT_VERSION, num_classes=num_classes,
                  train_per_class=train_per_class, val_per_class=val_per_class,
                  image_size=[lo, hi], seed=seed, quality=quality)

    def generate():
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            for c in range(num_classes):
                folder = root / split / _class_dir(c)
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    rng = random.Random(f"revvit-synthetic-{seed}-{split}-{c}-{i}")
                    img = _render(SHAPES[c], rng, (lo, hi))
                    img.save(folder / f"syn_{split}_{c:02d}_{i:04d}.JPEG", "JPEG",
                             quality=quality)

    if not generate_once(root, params, ("train", "val"), "make_synthetic_imagefolder", generate):
        return root
    logger.info("wrote synthetic ImageNet-layout folder %s (%d classes, %d train + %d val images)",
                root, num_classes, num_classes * train_per_class, num_classes * val_per_class)
    return root


# --------------------------------------------------------------------------------------------
# Official eval preprocessing
# --------------------------------------------------------------------------------------------
def _interpolation(name):
    from torchvision.transforms import InterpolationMode

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
    from torchvision import transforms as T

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
    """Returned by :class:`SafeImageFolder` in place of a sample that could not be read."""

    path: str
    error: str


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
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")  # forces the full decode inside the try of __getitem__


class SafeImageFolder(ImageFolder):
    """``torchvision.datasets.ImageFolder`` that does not crash on an unreadable image.

    ``dataset[i]`` is ``(image, label)``, or a :class:`SkippedSample` when decoding or the
    transform raised; :func:`collate_skip_corrupt` drops those from the batch and reports them,
    which works with any number of loader workers. ``self.skipped`` also counts them when the
    dataset is read in this process. A missing or empty directory raises at construction
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
        self.skipped = 0

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
            if self.transform is not None:
                sample = self.transform(sample)
        except (OSError, ValueError, SyntaxError) as e:
            # PIL raises UnidentifiedImageError (an OSError) for garbage bytes, OSError for a
            # truncated file, SyntaxError / ValueError for some broken headers.
            self.skipped += 1
            return SkippedSample(path, f"{type(e).__name__}: {e}")
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


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
    from torch.utils.data import DataLoader, Subset

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
