"""Detectron2 data parts: the built-in shapes dataset's registration and a dataset mapper that
survives bad input.

* :func:`register_synthetic_coco` generates the built-in COCO shapes dataset
  (:mod:`revvit_d2.data.synthetic.coco_shapes`) on first use under
  ``$REVVIT_DATASETS/coco_synthetic`` (default ``./datasets/coco_synthetic``) and registers the
  two splits (``revvit_shapes_train`` / ``revvit_shapes_val``) with detectron2's
  ``register_coco_instances``. Safe to call repeatedly and from several processes.
* :class:`SafeDatasetMapper` is detectron2's ``DatasetMapper`` with the image read guarded: a
  missing or unreadable image file is logged, counted (across data-loader workers) and the
  mapper returns ``None``, which detectron2's ``MapDataset`` answers by trying another sample.
  It also loads 16-bit grayscale images correctly and cleans annotations that crash the stock
  mapper (see the class docstring). :func:`num_skipped` sums the skips of all live mappers.
"""
import copy
import logging
import os
import tempfile
import weakref
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.datasets import register_coco_instances
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

from revvit_d2.data.synthetic.coco_shapes import (CLASSES, default_coco_synthetic_root,
                                                  make_synthetic_coco)
from revvit_d2.utils.errors import one_line

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_NAMES", "register_synthetic_coco", "SafeDatasetMapper", "num_skipped",
           "read_image_3ch"]

#: The names the built-in shapes dataset is registered under (train, val).
DEFAULT_NAMES = ("revvit_shapes_train", "revvit_shapes_val")


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

    What is overridden, and why: ``__call__`` only for the image read (detectron2 has no hook
    for it; see :meth:`__call__`) and the empty annotations; ``_transform_annotations`` for the
    annotation cleaning. The skip counter is a file shared with the data-loader workers
    (:class:`_SkipLog`) because detectron2's ``MapDataset`` retries a rejected sample silently
    and counts nothing.
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
            logger.warning("SafeDatasetMapper: skipping %s (%s); %d image(s) skipped so far",
                           dataset_dict.get("file_name"), one_line(error), n)

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
        """``DatasetMapper.__call__`` with the image read replaced (:func:`read_image_3ch`,
        failures skipped and counted) and empty annotations given to training dicts without
        any. Everything after the read is detectron2's body unchanged: it is restated here
        because ``DatasetMapper`` reads the image inline (``utils.read_image``) with no method
        to override, and reading first to check and letting detectron2 read again would decode
        every image twice and still saturate 16-bit images."""
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
        if self.is_train and "annotations" not in dataset_dict and sem_seg_gt is None:
            dataset_dict["annotations"] = []
        # detectron2's DatasetMapper.__call__ from here on.
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
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict
