"""The built-in COCO-format instance-segmentation dataset: shapes on random backgrounds.

:func:`make_synthetic_coco` writes a small deterministic dataset of *shape* instances (circle,
square, triangle, star, cross, ring) in the COCO layout: ``root/{train,val}/*.jpg`` and
``root/annotations/instances_{train,val}.json`` with RLE masks of the *visible* part of every
instance. Colours are random and independent of the class; the class is the shape. Later
instances are drawn over earlier ones, so masks and boxes describe what is visible; the
placement never leaves an instance less than ``min_visible`` visible.

The masks are RLE, so training must use bitmask masks: ``cfg.INPUT.MASK_FORMAT = "bitmask"``.
Registering the two splits with detectron2 (``revvit_shapes_train`` / ``revvit_shapes_val``) is
the Detectron2 wrapping's part: :func:`revvit_d2.d2.data.register_synthetic_coco`.
"""
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, ImageDraw

from revvit_d2.utils.io import atomic_write
from revvit_d2.utils.paths import default_datasets_root

from ..generated import generate_once

logger = logging.getLogger(__name__)

__all__ = ["CLASSES", "default_coco_synthetic_root", "make_synthetic_coco"]

#: Category ``i + 1`` of the json is ``CLASSES[i]`` (contiguous id ``i`` in detectron2).
CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
_FORMAT_VERSION = 1
_OWNED = ("train", "val", "annotations", "stats.json")
_SPLIT_CODE = {"train": 1, "val": 2}


def default_coco_synthetic_root() -> Path:
    """``$REVVIT_DATASETS/coco_synthetic`` (``./datasets/coco_synthetic`` by default)."""
    return default_datasets_root() / "coco_synthetic"


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
_SS = 2  # supersampling factor: shapes are rasterised at 2x, masks = coverage >= 1/2


def _polygon(cx, cy, radii, n, phase):
    """Vertices at angles ``phase + 2*pi*k/n`` with radius ``radii[k % len(radii)]``."""
    return [(cx + radii[k % len(radii)] * math.cos(phase + 2 * math.pi * k / n),
             cy + radii[k % len(radii)] * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def _cross(cx, cy, r, t, phase):
    """A plus sign of half-length ``r`` and half-thickness ``t``, rotated by ``phase``."""
    pts = [(t, r), (t, t), (r, t), (r, -t), (t, -t), (t, -r),
           (-t, -r), (-t, -t), (-r, -t), (-r, t), (-t, t), (-t, r)]
    c, s = math.cos(phase), math.sin(phase)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _shape_coverage(shape: str, cx: float, cy: float, r: float, rng: np.random.Generator):
    """Coverage in [0, 1] of one shape in its window ``(x0, y0)`` + ``cov.shape``: the shape
    is rasterised at ``_SS`` x and box-filtered down (anti-aliased edges)."""
    k = _SS
    x0, y0 = int(math.floor(cx - r)) - 1, int(math.floor(cy - r)) - 1
    size = int(math.ceil(2 * r)) + 3
    img = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(img)
    lx, ly, r = (cx - x0) * k, (cy - y0) * k, r * k
    phase = float(rng.uniform(0, 2 * math.pi))
    if shape == "circle":
        draw.ellipse([lx - r, ly - r, lx + r, ly + r], fill=255)
    elif shape == "square":
        draw.polygon(_polygon(lx, ly, [r], 4, phase), fill=255)
    elif shape == "triangle":
        draw.polygon(_polygon(lx, ly, [r], 3, phase), fill=255)
    elif shape == "star":
        draw.polygon(_polygon(lx, ly, [r, r * float(rng.uniform(0.38, 0.5))], 10, phase),
                     fill=255)
    elif shape == "cross":
        draw.polygon(_cross(lx, ly, r, r * float(rng.uniform(0.22, 0.34)), phase), fill=255)
    elif shape == "ring":
        inner = r * float(rng.uniform(0.45, 0.62))
        draw.ellipse([lx - r, ly - r, lx + r, ly + r], fill=255)
        draw.ellipse([lx - inner, ly - inner, lx + inner, ly + inner], fill=0)
    else:  # pragma: no cover - CLASSES and this function are kept in sync
        raise ValueError(shape)
    img = img.resize((size, size), Image.BOX)
    return x0, y0, np.asarray(img, dtype=np.float32) * (1.0 / 255.0)


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1] (HxW): a random ``cells`` grid upsampled bilinearly."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    up = Image.fromarray(grid, "L").resize((w, h), Image.BILINEAR)
    return np.asarray(up, dtype=np.float32) * (1.0 / 255.0)


def _background(rng: np.random.Generator, w: int, h: int, style: str):
    """Random-colour background (float32 HxWx3) and its base colours: ``"textured"`` (smooth
    two-colour noise, a few faint lines, pixel noise) or ``"plain"`` (one colour, pixel noise)."""
    c0 = rng.integers(0, 256, 3).astype(np.float32)
    if style == "plain":
        bg = np.broadcast_to(c0, (h, w, 3)).copy()
        bg += rng.standard_normal((h, w, 1), dtype=np.float32) * float(rng.uniform(2, 6))
        return bg, (c0,)
    c1 = np.clip(c0 + rng.integers(-70, 71, 3), 0, 255).astype(np.float32)
    t = _smooth_noise(rng, w, h, int(rng.integers(3, 9)))[..., None]
    bg = c0 + (c1 - c0) * t
    # A few faint lines (clutter that is no object).
    n_lines = int(rng.integers(0, 4))
    if n_lines:
        layer = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(layer)
        for _ in range(n_lines):
            col = tuple(int(v) for v in np.clip(c0 + rng.integers(-45, 46, 3), 0, 255))
            x0, x1 = rng.uniform(0, w, 2)
            y0, y1 = rng.uniform(0, h, 2)
            draw.line([(float(x0), float(y0)), (float(x1), float(y1))], fill=col,
                      width=int(rng.integers(1, 4)))
        bg = np.asarray(layer, dtype=np.float32)
    # Pixel noise, luminance only (as most sensor noise).
    bg += rng.standard_normal((h, w, 1), dtype=np.float32) * float(rng.uniform(3, 12))
    return bg, (c0, c1)


def _pick_colour(rng: np.random.Generator, avoid: Sequence[np.ndarray], min_bg: float,
                 bg_cols: Sequence[np.ndarray], min_obj: float) -> np.ndarray:
    best, best_score = None, -1.0
    for _ in range(50):
        c = rng.integers(0, 256, 3).astype(np.float32)
        d_bg = min(float(np.abs(c - b).sum()) for b in bg_cols)
        d_obj = min((float(np.abs(c - a).sum()) for a in avoid), default=1e9)
        if d_bg >= min_bg and d_obj >= min_obj:
            return c
        score = min(d_bg / min_bg, d_obj / min_obj)
        if score > best_score:
            best, best_score = c, score
    return best


def _place(rng: np.random.Generator, shape: str, w: int, h: int,
           object_size: Tuple[float, float], placed: Sequence[Tuple[int, np.ndarray, int]],
           min_visible: float, min_area: int):
    """A position, size and coverage for one new instance drawn on top of `placed`, or None
    after 25 tries: ``(coverage, window, full_mask, full_area)``. Every earlier instance must
    stay at least ``min_visible`` of its area (and ``min_area`` pixels) visible."""
    short = min(w, h)
    for _attempt in range(25):
        r = 0.5 * short * float(rng.uniform(*object_size))
        cx = float(rng.uniform(r + 1, w - r - 1))
        cy = float(rng.uniform(r + 1, h - r - 1))
        x0, y0, cov = _shape_coverage(shape, cx, cy, r, rng)
        # The window can stick out of the image by the 1-2 px margin: crop it.
        cx0, cy0 = max(0, -x0), max(0, -y0)
        cov = cov[cy0:min(cov.shape[0], h - y0), cx0:min(cov.shape[1], w - x0)]
        x0, y0 = x0 + cx0, y0 + cy0
        win = (slice(y0, y0 + cov.shape[0]), slice(x0, x0 + cov.shape[1]))
        full = np.zeros((h, w), dtype=bool)
        full[win] = cov >= 0.5
        area = int(np.count_nonzero(full))
        if area < min_area:
            continue
        union = full.copy()
        for _c, m_prev, a_prev in reversed(placed):
            visible = int(np.count_nonzero(m_prev & ~union))
            if visible < max(min_area, min_visible * a_prev):
                break
            union |= m_prev
        else:
            return cov, win, full, area
    return None


def _render_image(rng: np.random.Generator, image_size: Tuple[int, int],
                  object_size: Tuple[float, float], max_instances: int, min_visible: float,
                  min_area: int, background: str):
    """One image (uint8 HxWx3) and its instances ``[(class_index, visible_mask, full_area)]``
    (masks HxW bool, in drawing order)."""
    lo, hi = image_size
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    img, bg_cols = _background(rng, w, h, background)
    n = int(rng.integers(1, max_instances + 1))
    placed: List[Tuple[int, np.ndarray, int]] = []  # (class, full mask, full area)
    colours: List[np.ndarray] = []
    for _ in range(n):
        cls = int(rng.integers(len(CLASSES)))
        spot = _place(rng, CLASSES[cls], w, h, object_size, placed, min_visible, min_area)
        if spot is None:
            continue  # no valid position for this instance: the image has one fewer
        cov, win, full, area = spot
        colour = _pick_colour(rng, colours, 150.0, bg_cols, 110.0)
        colours.append(colour)
        # A slightly shaded, noisy fill so that objects are not flat colour.
        wh, ww = cov.shape
        shade = (_smooth_noise(rng, ww, wh, 3)[..., None] - 0.5) * float(rng.uniform(0, 50))
        fill = colour + shade + rng.standard_normal((wh, ww, 1), dtype=np.float32) * 4.0
        alpha = cov[..., None]
        img[win] = img[win] * (1 - alpha) + fill * alpha
        placed.append((cls, full, area))
    # Visible masks: everything drawn later occludes.
    instances = []
    occupied = np.zeros((h, w), dtype=bool)
    for cls, full, area in reversed(placed):
        visible = full & ~occupied
        occupied |= full
        if np.count_nonzero(visible) >= min_area:  # fully (or almost fully) occluded: dropped
            instances.append((cls, visible, area))
    instances.reverse()
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), instances


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
def _generate_split(root: Path, split: str, num_images: int, params: dict, stats: dict):
    img_dir = root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    per_class = [0] * len(CLASSES)
    occluded_images = occluded_instances = 0
    ann_id = 1
    for i in range(num_images):
        rng = np.random.default_rng([params["seed"], _SPLIT_CODE[split], i, _FORMAT_VERSION])
        img, instances = _render_image(rng, tuple(params["image_size"]),
                                       tuple(params["object_size"]), params["max_instances"],
                                       params["min_visible"], params["min_area"],
                                       params["background"])
        h, w = img.shape[:2]
        file_name = f"{split}_{i:06d}.jpg"
        Image.fromarray(img, "RGB").save(img_dir / file_name, "JPEG",
                                         quality=params["quality"])
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        any_occluded = False
        for cls, mask, full_area in instances:
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            area = int(mask_util.area(rle))
            bbox = [float(v) for v in mask_util.toBbox(rle)]
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": cls + 1,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "area": float(area), "bbox": bbox, "iscrowd": 0,
            })
            ann_id += 1
            per_class[cls] += 1
            if area < full_area:
                any_occluded = True
                occluded_instances += 1
        occluded_images += any_occluded
    coco = {
        "info": {"description": f"revvit synthetic shapes ({split})", "version": _FORMAT_VERSION},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n, "supercategory": "shape"}
                       for k, n in enumerate(CLASSES)],
    }
    with atomic_write(root / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    stats[split] = {
        "images": num_images,
        "instances": len(annotations),
        "instances_per_class": dict(zip(CLASSES, per_class)),
        "occluded_instances": occluded_instances,
        "images_with_occlusion": occluded_images,
        "occlusion_fraction": occluded_images / max(1, num_images),
    }


def _paths(root: Path) -> Dict[str, Path]:
    return {
        "root": root,
        "train_images": root / "train",
        "val_images": root / "val",
        "train_json": root / "annotations" / "instances_train.json",
        "val_json": root / "annotations" / "instances_val.json",
        "stats": root / "stats.json",
    }


def make_synthetic_coco(root: Union[str, os.PathLike], num_train: int = 1000,
                        num_val: int = 200, seed: int = 0,
                        image_size: Tuple[int, int] = (128, 144),
                        object_size: Tuple[float, float] = (0.3, 0.65),
                        max_instances: int = 3, min_visible: float = 0.6,
                        min_area: int = 16, quality: int = 90,
                        background: str = "plain") -> Dict[str, Path]:
    """Write (once) the deterministic synthetic COCO-format shapes dataset.

    Layout::

        root/train/train_000000.jpg ...     root/val/val_000000.jpg ...
        root/annotations/instances_train.json   root/annotations/instances_val.json
        root/stats.json   root/.complete

    Every image (width and height drawn independently from ``image_size``, inclusive) has a
    random-colour background (``background="plain"``: one colour and pixel noise;
    ``"textured"``: smooth two-colour noise, faint lines and pixel noise) and
    1..``max_instances`` shapes of a random class,
    colour, rotation, position and size (circumscribed diameter ``object_size`` x the short
    side), fully inside the image. Later shapes are drawn over earlier ones; the json holds the
    visible part (RLE ``segmentation``, ``bbox`` XYWH = its tight box, ``area`` = its pixel
    count, ``iscrowd`` 0, ``category_id`` 1..6 = :data:`CLASSES`). A shape is only placed where
    it leaves every earlier one at least ``min_visible`` of its area visible; instances with
    fewer than ``min_area`` visible pixels are dropped. Image ``i`` of a split depends only on
    ``(seed, split, i)``.

    Idempotent and safe across processes (:func:`revvit_d2.data.generated.generate_once`): the
    work is done under a file lock (``root/.lock``); a ``.complete`` marker holding the
    parameters is written last. With the same parameters nothing is done; with other
    parameters, or after an interrupted run (``.in_progress`` marker), the dataset is rewritten
    from scratch. A ``root`` holding ``train/``, ``val/``, ``annotations/`` or ``stats.json``
    without either marker was not made here and is left alone (``FileExistsError``).

    Returns:
        dict of paths: ``root``, ``train_images``, ``val_images``, ``train_json``,
        ``val_json``, ``stats``.
    """
    root = Path(root)
    lo, hi = int(image_size[0]), int(image_size[1])
    if not 32 <= lo <= hi:
        raise ValueError(f"image_size must be (min, max) with 32 <= min <= max, got {image_size}")
    s_lo, s_hi = float(object_size[0]), float(object_size[1])
    if not 0 < s_lo <= s_hi < 1:
        raise ValueError(f"object_size must be (min, max) fractions in (0, 1), got {object_size}")
    if int(num_train) < 1 or int(num_val) < 1 or int(max_instances) < 1:
        raise ValueError("num_train, num_val and max_instances must be positive")
    if not 0 <= float(min_visible) < 1:
        raise ValueError(f"min_visible must be in [0, 1), got {min_visible}")
    if background not in ("textured", "plain"):
        raise ValueError(f"background must be 'textured' or 'plain', got {background!r}")
    params = dict(version=_FORMAT_VERSION, num_train=int(num_train), num_val=int(num_val),
                  seed=int(seed), image_size=[lo, hi], object_size=[s_lo, s_hi],
                  max_instances=int(max_instances), min_visible=float(min_visible),
                  min_area=int(min_area), quality=int(quality), classes=list(CLASSES),
                  background=background)
    paths = _paths(root)
    t0 = time.perf_counter()

    def generate():
        (root / "annotations").mkdir()
        stats: dict = {}
        _generate_split(root, "train", params["num_train"], params, stats)
        _generate_split(root, "val", params["num_val"], params, stats)
        paths["stats"].write_text(json.dumps(stats, indent=1))

    required = [str(paths[k].relative_to(root)) for k in ("train_json", "val_json")]
    if not generate_once(root, params, _OWNED, "make_synthetic_coco", generate, required):
        return paths
    logger.info("wrote synthetic COCO shapes to %s in %.1fs (%d train / %d val images)",
                root, time.perf_counter() - t0, num_train, num_val)
    return paths