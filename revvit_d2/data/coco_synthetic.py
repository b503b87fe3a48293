"""A built-in COCO-format instance-segmentation dataset, and a dataset mapper that survives bad
input.

* :func:`make_synthetic_coco` writes a small deterministic dataset of *shape* instances (circle,
  square, triangle, star, cross, ring) in the COCO layout: ``root/{train,val}/*.jpg`` and
  ``root/annotations/instances_{train,val}.json`` with RLE masks of the *visible* part of every
  instance. Colours are random and independent of the class; the class is the shape. Later
  instances are drawn over earlier ones, so masks and boxes describe what is visible; the
  placement never leaves an instance less than ``min_visible`` visible.
* :func:`register_synthetic_coco` generates it on first use under
  ``$REVVIT_DATASETS/coco_synthetic`` (default ``./datasets/coco_synthetic``) and registers the
  two splits (``revvit_shapes_train`` / ``revvit_shapes_val``) with detectron2's
  ``register_coco_instances``. Safe to call repeatedly and from several processes.
* :class:`SafeDatasetMapper` is detectron2's ``DatasetMapper`` with the image read guarded: a
  missing or unreadable image file is logged, counted (across data-loader workers) and the
  mapper returns ``None``, which detectron2's ``MapDataset`` answers by trying another sample.
  It also loads 16-bit grayscale images correctly and cleans annotations that crash the stock
  mapper (see the class docstring).

The masks are RLE, so training must use bitmask masks: ``cfg.INPUT.MASK_FORMAT = "bitmask"``
(:class:`SafeDatasetMapper` also switches to bitmasks by itself, per image, when it meets RLE
under the default polygon format).
"""
import copy
import json
import logging
import math
import os
import tempfile
import time
import weakref
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .generated import generate_once
from .imagefolder import default_datasets_root

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSES",
    "DEFAULT_NAMES",
    "default_coco_synthetic_root",
    "make_synthetic_coco",
    "register_synthetic_coco",
    "SafeDatasetMapper",
    "num_skipped",
    "read_image_3ch",
]

#: Category ``i + 1`` of the json is ``CLASSES[i]`` (contiguous id ``i`` in detectron2).
CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
DEFAULT_NAMES = ("revvit_shapes_train", "revvit_shapes_val")
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
    from PIL import Image, ImageDraw

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
    from PIL import Image

    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    up = Image.fromarray(grid, "L").resize((w, h), Image.BILINEAR)
    return np.asarray(up, dtype=np.float32) * (1.0 / 255.0)


def _background(rng: np.random.Generator, w: int, h: int, style: str):
    """Random-colour background (float32 HxWx3) and its base colours: ``"textured"`` (smooth
    two-colour noise, a few faint lines, pixel noise) or ``"plain"`` (one colour, pixel noise)."""
    from PIL import Image, ImageDraw

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


def _render_image(rng: np.random.Generator, image_size: Tuple[int, int],
                  object_size: Tuple[float, float], max_instances: int, min_visible: float,
                  min_area: int, background: str):
    """One image (uint8 HxWx3) and its instances ``[(class_index, visible_mask, full_area)]``
    (masks HxW bool, in drawing order)."""
    lo, hi = image_size
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    img, bg_cols = _background(rng, w, h, background)
    short = min(w, h)
    n = int(rng.integers(1, max_instances + 1))
    placed: List[Tuple[int, np.ndarray, int]] = []  # (class, full mask, full area)
    colours: List[np.ndarray] = []
    for _ in range(n):
        cls = int(rng.integers(len(CLASSES)))
        for _attempt in range(25):
            r = 0.5 * short * float(rng.uniform(*object_size))
            cx = float(rng.uniform(r + 1, w - r - 1))
            cy = float(rng.uniform(r + 1, h - r - 1))
            x0, y0, cov = _shape_coverage(CLASSES[cls], cx, cy, r, rng)
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
            # The new shape goes on top: every earlier instance must stay >= min_visible visible.
            union = full.copy()
            ok = True
            for _c, m_prev, a_prev in reversed(placed):
                visible = int(np.count_nonzero(m_prev & ~union))
                if visible < max(min_area, min_visible * a_prev):
                    ok = False
                    break
                union |= m_prev
            if ok:
                break
        else:
            continue  # no valid position for this instance: the image has one fewer
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
def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
    os.replace(tmp, path)


def _generate_split(root: Path, split: str, num_images: int, params: dict, stats: dict):
    from PIL import Image
    import pycocotools.mask as mask_util

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
    _write_json_atomic(root / "annotations" / f"instances_{split}.json", coco)
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


def register_synthetic_coco(root: Optional[Union[str, os.PathLike]] = None,
                            names: Sequence[str] = DEFAULT_NAMES, **gen_kwargs) -> Tuple[str, str]:
    """Generate (first use only) and register the synthetic shapes dataset with detectron2.

    Args:
        root: dataset folder; default :func:`default_coco_synthetic_root`
            (``$REVVIT_DATASETS/coco_synthetic``, ``./datasets/coco_synthetic``).
        names: the (train, val) dataset names.
        gen_kwargs: passed to :func:`make_synthetic_coco`.

    A name already registered with the same json file is left as it is; one registered with
    another file is replaced (with a warning). Safe to call from several processes (DDP ranks):
    one generates, the others wait on the lock.

    Returns:
        the (train, val) names.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    if len(names) != 2:
        raise ValueError(f"names must be (train_name, val_name), got {names!r}")
    root = Path(root) if root is not None else default_coco_synthetic_root()
    paths = make_synthetic_coco(root, **gen_kwargs)
    metadata = {
        "thing_classes": list(CLASSES),
        "thing_dataset_id_to_contiguous_id": {k + 1: k for k in range(len(CLASSES))},
    }
    for name, split in zip(names, ("train", "val")):
        json_file, image_root = str(paths[f"{split}_json"]), str(paths[f"{split}_images"])
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file") == json_file:
                continue
            logger.warning("dataset %r is registered with another json file; re-registering it "
                           "with %s", name, json_file)
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, dict(metadata), json_file, image_root)
    return tuple(names)


# --------------------------------------------------------------------------------------------
# Bad-input tolerant mapper
# --------------------------------------------------------------------------------------------
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def read_image_3ch(file_name: str, format: Optional[str] = "BGR") -> np.ndarray:
    """``detectron2.data.detection_utils.read_image``, plus 16/32-bit grayscale handling.

    detectron2's reader converts any PIL mode with ``Image.convert`` (fine for ``L``, ``LA``,
    ``P``, ``1``, ``CMYK``; ``RGBA`` loses its alpha channel), but ``convert("RGB")`` of a 16-bit
    PNG (mode ``I;16``) saturates every value above 255 to white. Such images are rescaled to
    8 bits here (values divided by 257 when the image uses the 16-bit range).
    """
    from PIL import Image, ImageOps
    from detectron2.utils.file_io import PathManager

    exif = getattr(utils, "_apply_exif_orientation", ImageOps.exif_transpose)
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image = exif(image)
        if image.mode in _HIGH_BIT_MODES:
            a = np.asarray(image, dtype=np.float64)
            if a.size and (a.max() > 255 or image.mode.startswith("I;16")):
                a = a / 257.0
            elif image.mode == "F" and a.size and a.max() <= 1.0:
                a = a * 255.0
            image = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        return utils.convert_PIL_to_numpy(image, format)


def _remove_if_owner(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # not from forked workers, which inherit the finalizer
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class _SkipLog:
    """Append-only log of skipped files shared by a mapper and its data-loader workers.

    One line per skip in a temporary file, appended with ``O_APPEND`` (atomic for one short
    write). It pickles as its path, so it works whatever the worker start method (detectron2
    pickles the mapper with cloudpickle under ``spawn`` / ``forkserver``, which shared-memory
    values do not survive). The file is removed when the owning object is collected in the
    process that made it.
    """

    def __init__(self):
        fd, self.path = tempfile.mkstemp(prefix="revvit_skipped_", suffix=".log")
        os.close(fd)
        weakref.finalize(self, _remove_if_owner, self.path, os.getpid())

    def add(self, file_name) -> int:
        line = str(file_name).replace("\n", " ").encode("utf-8", "replace")[:4000] + b"\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:  # never let the bookkeeping break training
            logger.debug("could not record a skipped image in %s: %s", self.path, e)
        return self.count

    def files(self) -> List[str]:
        try:
            with open(self.path, "rb") as f:
                return [x.decode("utf-8", "replace") for x in f.read().splitlines()]
        except OSError:
            return []

    @property
    def count(self) -> int:
        return len(self.files())

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]


_READ_ERRORS: Tuple[type, ...] = (OSError, ValueError, SyntaxError, EOFError)
_LIVE_MAPPERS: "weakref.WeakSet" = weakref.WeakSet()


def num_skipped() -> int:
    """Images skipped so far by all live :class:`SafeDatasetMapper` s made in this process
    (their data-loader workers included)."""
    return sum(m.num_skipped for m in list(_LIVE_MAPPERS))


def _valid_polygons(segm) -> list:
    return [p for p in segm if len(p) % 2 == 0 and len(p) >= 6]


class SafeDatasetMapper(DatasetMapper):
    """``detectron2.data.DatasetMapper`` that does not crash on bad input.

    Same constructor and config (``SafeDatasetMapper(cfg, is_train=True)``) and the same
    output as ``DatasetMapper`` on good input, plus:

    * a missing or unreadable image (or ``sem_seg_file_name``) file: a warning is logged
      (the first ``max_warnings``, then every 100th), :attr:`num_skipped` grows and
      ``None`` is returned; detectron2's ``MapDataset`` (used by
      ``build_detection_train_loader`` / ``build_detection_test_loader``) then maps another,
      random sample instead. In a *test* loader this means an image is replaced by another,
      so evaluation should not run on data with skips (the count tells).
    * grayscale (``L``, ``LA``, ``1``), palette, CMYK and RGBA images load as 3 channels
      (RGBA drops its alpha, as in detectron2); 16-bit grayscale is rescaled to 8 bits
      instead of saturating (:func:`read_image_3ch`).
    * training dicts without an ``annotations`` key get empty instances (the model needs
      ``instances`` on every image of a batch);
    * when masks are used (``use_instance_mask``), annotations with no valid segmentation
      (missing, empty, or only polygons with < 3 points) are dropped, with one warning. Stock
      detectron2 raises ``KeyError: 'segmentation'`` when an image mixes them with annotations
      that have one, and builds instances without ``gt_masks`` (the mask head fails later)
      when none has one. RLE / array masks under ``mask_format="polygon"`` are turned into
      bitmasks for that image (stock: ``ValueError``);
    * degenerate boxes (zero width or height) and empty masks are removed by detectron2's
      own ``filter_empty_instances``, as in ``DatasetMapper``.

    A width/height in the dict that disagrees with the image still raises
    ``SizeMismatchError`` (an annotation error, not a bad file).
    """

    @configurable
    def __init__(self, is_train: bool = True, *, max_warnings: int = 10, **kwargs):
        super().__init__(is_train, **kwargs)
        self.max_warnings = int(max_warnings)
        self._skips = _SkipLog()
        self._warned_format = self._warned_segm = False
        _LIVE_MAPPERS.add(self)

    @property
    def num_skipped(self) -> int:
        """Images skipped by this mapper, summed over the data-loader workers that use it."""
        return self._skips.count

    @property
    def skipped_files(self) -> List[str]:
        """The ``file_name`` of every skip so far (a file skipped twice appears twice)."""
        return self._skips.files()

    def _skip(self, dataset_dict, error: BaseException):
        n = self._skips.add(dataset_dict.get("file_name"))
        if n <= self.max_warnings or n % 100 == 0:
            logger.warning("SafeDatasetMapper: skipping %s (%s: %s); %d image(s) skipped so "
                           "far", dataset_dict.get("file_name"), type(error).__name__,
                           error, n)

    def _clean_annotations(self, annos: List[dict]) -> Tuple[List[dict], bool]:
        """Drop the annotations that would crash ``annotations_to_instances`` or the mask head;
        tell whether the image needs bitmasks."""
        if not self.use_instance_mask:
            return annos, False
        kept, needs_bitmask = [], False
        for a in annos:
            segm = a.get("segmentation")
            if isinstance(segm, list):
                segm = _valid_polygons(segm)
                if segm:
                    a["segmentation"] = segm
                    kept.append(a)
            elif isinstance(segm, (dict, np.ndarray)):
                kept.append(a)
                needs_bitmask = True
        dropped = len(annos) - len(kept)
        if dropped and not self._warned_segm:
            logger.warning("SafeDatasetMapper: dropping %d annotation(s) without a valid "
                           "segmentation (masks are trained); warned once", dropped)
            self._warned_segm = True
        return kept, needs_bitmask and self.instance_mask_format == "polygon"

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        annos, to_bitmask = self._clean_annotations(dataset_dict["annotations"])
        dataset_dict["annotations"] = annos
        if not to_bitmask:
            return super()._transform_annotations(dataset_dict, transforms, image_shape)
        if not self._warned_format:
            logger.warning("SafeDatasetMapper: RLE masks with INPUT.MASK_FORMAT='polygon'; "
                           "using bitmasks for those images (set "
                           "INPUT.MASK_FORMAT='bitmask' to silence this)")
            self._warned_format = True
        self.instance_mask_format = "bitmask"
        try:
            return super()._transform_annotations(dataset_dict, transforms, image_shape)
        finally:
            self.instance_mask_format = "polygon"

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        try:
            image = read_image_3ch(dataset_dict["file_name"], format=self.image_format)
            sem_seg_gt = None
            if "sem_seg_file_name" in dataset_dict:
                sem_seg_gt = read_image_3ch(dataset_dict.pop("sem_seg_file_name"),
                                            "L").squeeze(2)
        except _READ_ERRORS as e:
            self._skip(dataset_dict, e)
            return None
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms,
                                      proposal_topk=self.proposal_topk)
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict
        if "annotations" not in dataset_dict and "sem_seg" not in dataset_dict:
            dataset_dict["annotations"] = []
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict
