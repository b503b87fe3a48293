"""The built-in ImageNet-layout folder: one shape class per folder.

:func:`make_synthetic_imagefolder` writes a small deterministic ``root/{train,val}/<class>/*.JPEG``
folder whose classes are *shapes* (circle, square, triangle, ...) drawn at a random position,
scale and colour on images of varied, mostly non-square sizes. It is what the built-in ImageNet
evaluation demo runs on, since no real data can be downloaded here; it is read with
:class:`revvit_d2.data.imagefolder.SafeImageFolder`.
"""
import logging
import math
import os
import random
from pathlib import Path
from typing import Tuple, Union

from PIL import Image, ImageDraw

from revvit_d2.utils.paths import default_datasets_root

from ..generated import generate_once

logger = logging.getLogger(__name__)

__all__ = ["SHAPES", "default_synthetic_root", "make_synthetic_imagefolder"]

# Class folders sort (as ImageFolder sorts them) in this order, so folder i is label i.
SHAPES = ("circle", "square", "triangle", "cross", "ring", "stripes", "checker", "star",
          "crescent", "dots")
_FORMAT_VERSION = 1


def default_synthetic_root() -> Path:
    """Where the built-in synthetic ImageNet-layout folder lives (``<datasets>/imagenet_synthetic``)."""
    return default_datasets_root() / "imagenet_synthetic"


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
