"""Detectron2 data parts: the built-in shapes dataset's registration and a dataset mapper that
survives bad input.

* :func:`register_synthetic_coco` generates the built-in COCO shapes dataset
  (:mod:`revvit_d2.data.synthetic.coco_shapes`) on first use under
  ``$REVVIT_DATASETS/coco_synthetic`` (default ``./datasets/coco_synthetic``) and registers the
  two splits (``revvit_shapes_train`` / ``revvit_shapes_val``) with
  :func:`revvit_d2.d2.coco_json.register_coco_instances` (detectron2's, with the json checked
  first; the generated json is clean, so detectron2 reads it as it is). Safe to call
  repeatedly and from several processes.
* :class:`SafeDatasetMapper` is detectron2's ``DatasetMapper`` with the image read guarded: a
  missing, unreadable or empty image file, or one whose size differs from its annotation, is
  logged once, counted (distinct files, across data-loader workers) and the mapper returns
  ``None``, which detectron2's ``MapDataset`` answers by trying another sample. It also loads
  16-bit grayscale images correctly and cleans annotations that crash the stock mapper (see the
  class docstring). :func:`num_skipped` and :func:`skip_summary` report the distinct skipped
  files of all live mappers, per reason.
"""
import collections
import copy
import itertools
import logging
import os
import tempfile
import weakref
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

from revvit_d2.data.images import (READ_ERRORS, SIZE_DIFFERS, high_bit_to_8bit,
                                   read_failure_reason, size_mismatch)
from revvit_d2.data.synthetic.coco_shapes import (CLASSES, default_coco_synthetic_root,
                                                  make_synthetic_coco)
from revvit_d2.utils.errors import UserError, one_line

from .coco_json import register_coco_instances

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_NAMES", "register_synthetic_coco", "SafeDatasetMapper", "num_skipped",
           "skipped_by_file", "skip_summary", "NoUsableImagesError", "SIZE_MISMATCH",
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
def read_image_3ch(file_name: str, format: Optional[str] = "BGR") -> np.ndarray:
    """``detectron2.data.detection_utils.read_image``, plus 16/32-bit grayscale handling.

    detectron2's reader applies the EXIF orientation and converts any PIL mode with
    ``Image.convert`` (fine for ``L``, ``LA``, ``P``, ``1``, ``CMYK``; ``RGBA`` loses its alpha
    channel), but ``convert("RGB")`` of a 16-bit PNG (mode ``I;16``) saturates every value above
    255 to white. Such images are rescaled to 8 bits here
    (:func:`revvit_d2.data.images.high_bit_to_8bit`).
    """
    exif = getattr(utils, "_apply_exif_orientation", ImageOps.exif_transpose)
    with PathManager.open(file_name, "rb") as f:
        image = high_bit_to_8bit(exif(Image.open(f)))
        return utils.convert_PIL_to_numpy(image, format)


def _remove_if_owner(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # not from forked workers, which inherit the finalizer
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class _SkipLog:
    """Append-only log of skipped files shared by a mapper and its data-loader workers.

    One line per (process, file) in a temporary file: ``token<TAB>reason<TAB>file``, appended
    with ``O_APPEND`` (atomic for one short write), so the first line naming a file tells which
    process met it first (that one warns). Counts are of distinct files. It pickles as its path,
    so it works whatever the worker start method (detectron2 pickles the mapper with
    cloudpickle under ``spawn`` / ``forkserver``, which shared-memory values do not survive).
    The file is removed when the owning object is collected in the process that made it.
    """

    def __init__(self):
        fd, self.path = tempfile.mkstemp(prefix="revvit_skipped_", suffix=".log")
        os.close(fd)
        weakref.finalize(self, _remove_if_owner, self.path, os.getpid())

    @staticmethod
    def _clean(text) -> str:
        return " ".join(str(text).split())[:2000]

    def add(self, file_name, reason: str) -> bool:
        """Record a skip of `file_name`; True when this call is the first record of the file
        (in any process)."""
        token = f"{os.getpid()}-{next(_TOKENS)}"
        name = self._clean(file_name)
        line = "\t".join((token, self._clean(reason), name)).encode("utf-8", "replace") + b"\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:  # never let the bookkeeping break training
            logger.debug("could not record a skipped image in %s: %s", self.path, e)
            return True
        return self._records().get(name, (token,))[0] == token

    def _records(self) -> "dict":
        """``{file: (token, reason)}`` of the first record of each file, in log order. Only
        the lines added since the last call are read (a long run with many bad files stays
        linear); the parsed state is per process and is not pickled."""
        cache = self.__dict__.setdefault("_cache", {})
        try:
            with open(self.path, "rb") as f:
                f.seek(self.__dict__.get("_offset", 0))
                data = f.read()
        except OSError:
            return cache
        end = data.rfind(b"\n") + 1  # whole lines only
        self._offset = self.__dict__.get("_offset", 0) + end
        for line in data[:end].decode("utf-8", "replace").splitlines():
            parts = line.split("\t", 2)
            if len(parts) == 3 and parts[2] not in cache:
                cache[parts[2]] = (parts[0], parts[1])
        return cache

    def files(self) -> List[str]:
        """The distinct skipped files, in the order they were first met."""
        return list(self._records())

    def reasons(self) -> Dict[str, str]:
        """``{file: reason}`` of the distinct skipped files."""
        return {f: r for f, (_, r) in list(self._records().items())}

    @property
    def count(self) -> int:
        return len(self._records())

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]


_TOKENS = itertools.count()
_LIVE_MAPPERS: "weakref.WeakSet" = weakref.WeakSet()
#: The size check's reason label (the read failures' labels: :func:`read_failure_reason`).
SIZE_MISMATCH = SIZE_DIFFERS


class NoUsableImagesError(UserError):
    """Every image a mapper was given could be skipped: the dataset (or its image root) is
    unusable. Raised inside a data-loader worker, torch re-raises it in the main process with
    the worker's traceback in the message; the message is cut back to the original line."""

    def __init__(self, message: str):
        text = str(message)
        if "Original Traceback" in text:  # re-raised by torch's ExceptionWrapper
            last = text.strip().splitlines()[-1]
            text = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(text)


def num_skipped(is_train: Optional[bool] = None) -> int:
    """Distinct image files skipped so far by the live :class:`SafeDatasetMapper` s made in
    this process (their data-loader workers included); only training or only test mappers
    when `is_train` is given."""
    return len(skipped_by_file(is_train))


def skipped_by_file(is_train: Optional[bool] = None) -> Dict[str, str]:
    """``{file: reason}`` of the distinct files skipped by the live mappers (see
    :func:`num_skipped`)."""
    out: Dict[str, str] = {}
    for m in list(_LIVE_MAPPERS):
        if is_train is None or bool(m.is_train) == bool(is_train):
            for f, r in m._skips.reasons().items():
                out.setdefault(f, r)
    return out


def skip_summary(is_train: Optional[bool] = None, what: str = "image(s)") -> str:
    """``"3 image(s) were skipped: 2 unreadable, 1 size differs from the annotation"``, or
    ``""`` when nothing was skipped (live mappers of this process; see :func:`num_skipped`)."""
    reasons = skipped_by_file(is_train)
    if not reasons:
        return ""
    return f"{len(reasons)} {what} were skipped: {skip_summary_of(reasons)}"


def skip_summary_of(reasons: Dict[str, str]) -> str:
    """``"2 unreadable, 1 size differs from the annotation"`` from ``{file: reason}``."""
    counts = collections.Counter(reasons.values())
    return ", ".join(f"{n} {r}" for r, n in sorted(counts.items(), key=lambda x: (-x[1], x[0])))


def _valid_polygons(segm) -> list:
    return [p for p in segm if len(p) % 2 == 0 and len(p) >= 6]


class SafeDatasetMapper(DatasetMapper):
    """``detectron2.data.DatasetMapper`` that does not crash on bad input.

    Same constructor and config (``SafeDatasetMapper(cfg, is_train=True)``) and the same
    output as ``DatasetMapper`` on good input, plus:

    * an image that cannot be used is skipped: missing, a directory, an empty (zero-byte) file,
      an unreadable one (garbage, truncated, unsupported), or one whose size (after the EXIF
      rotation detectron2 applies) differs from the ``width`` / ``height`` of its dict
      (detectron2: ``SizeMismatchError``, which kills training). ``None`` is returned, which
      detectron2's ``MapDataset`` and the resumable training stream answer by mapping another
      sample. The first time a file is met (in any data-loader worker) one warning names it
      and the reason; later visits return ``None`` at once, without reading the file again.
      :attr:`num_skipped` counts *distinct* files over all workers; :func:`skip_summary` gives
      the counts per reason. In a *test* loader the skipped image is replaced by another, so
      an evaluation with skips is approximate (the count tells).
    * size mismatches are skipped, not rescaled: a resized-after-annotating image with the
      same aspect ratio could be rescaled safely, but a swapped or cropped one could not, and a
      count that says "skipped" is easier to act on than silently changed annotations.
    * when nothing can be used: after ``max_rejected_in_a_row`` (default 50) rejected images
      in a row, with none mapped yet in that process, :class:`NoUsableImagesError` (a one-line
      error for the tools) instead of an endless or obscure retry loop.
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
      own ``filter_empty_instances``, as in ``DatasetMapper``. Images with no annotation at all
      are removed before any mapping by ``get_detection_dataset_dicts(filter_empty=True)``
      (detectron2 logs how many).

    What is overridden, and why: ``__call__`` only for the image read and size check
    (detectron2 has no hook for them; see :meth:`__call__`) and the empty annotations;
    ``_transform_annotations`` for the annotation cleaning. The skip log is a file shared with
    the data-loader workers (:class:`_SkipLog`) because detectron2's ``MapDataset`` retries a
    rejected sample silently and counts nothing.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, max_warnings: Optional[int] = None,
                 max_rejected_in_a_row: int = 50, **kwargs):
        super().__init__(is_train, **kwargs)
        self.max_warnings = None if max_warnings is None else int(max_warnings)
        self.max_rejected_in_a_row = int(max_rejected_in_a_row)
        self._skips = _SkipLog()
        self._bad = {}  # file -> reason, in this process: not read again
        self._in_a_row, self._mapped_any = 0, False
        self._warned_format = self._warned_segm = False
        _LIVE_MAPPERS.add(self)

    @property
    def num_skipped(self) -> int:
        """Distinct image files skipped by this mapper and its data-loader workers."""
        return self._skips.count

    @property
    def skipped_files(self) -> List[str]:
        """The distinct skipped files, in the order they were first met."""
        return self._skips.files()

    @property
    def skipped_reasons(self) -> Dict[str, str]:
        """``{file: reason}`` of the distinct skipped files."""
        return self._skips.reasons()

    def _reject(self, dataset_dict, reason: str, detail: str = ""):
        """Skip this sample: record and warn (first meeting of the file only); None."""
        file_name = str(dataset_dict.get("file_name"))
        if file_name not in self._bad:
            self._bad[file_name] = reason
            if self._skips.add(file_name, reason):
                n = self._skips.count
                if self.max_warnings is None or n <= self.max_warnings:
                    logger.warning("SafeDatasetMapper: skipping %s: %s%s; %d distinct image(s) "
                                   "skipped so far", file_name, reason,
                                   f" ({detail})" if detail else "", n)
        self._in_a_row += 1
        if not self._mapped_any and self._in_a_row >= self.max_rejected_in_a_row:
            raise NoUsableImagesError(
                f"no usable image: the {self._in_a_row} images tried in a row were all skipped "
                f"({skip_summary_of(self._skips.reasons())}); check the dataset's json and "
                f"image root")
        return None

    def _check_size(self, dataset_dict, image) -> Optional[str]:
        """The size mismatch as words, or None when the image fits its dict."""
        if "width" not in dataset_dict and "height" not in dataset_dict:
            return None
        actual = (image.shape[1], image.shape[0])
        declared = (dataset_dict.get("width", actual[0]), dataset_dict.get("height", actual[1]))
        return size_mismatch(declared, actual)

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
        failures and size mismatches skipped and counted) and empty annotations given to
        training dicts without any. Everything after the read is detectron2's body unchanged:
        it is restated here because ``DatasetMapper`` reads the image inline
        (``utils.read_image``) with no method to override, and reading first to check and
        letting detectron2 read again would decode every image twice and still saturate
        16-bit images."""
        if str(dataset_dict.get("file_name")) in self._bad:  # met before: no second read
            return self._reject(dataset_dict, self._bad[str(dataset_dict.get("file_name"))])
        dataset_dict = copy.deepcopy(dataset_dict)
        path = dataset_dict["file_name"]
        try:
            image = read_image_3ch(path, format=self.image_format)
            sem_seg_gt = None
            if "sem_seg_file_name" in dataset_dict:
                path = dataset_dict.pop("sem_seg_file_name")
                sem_seg_gt = read_image_3ch(path, "L").squeeze(2)
        except READ_ERRORS as e:
            reason = read_failure_reason(path, e)
            if path != dataset_dict["file_name"]:
                reason = f"segmentation file {reason}"
            return self._reject(dataset_dict, reason, one_line(e))
        mismatch = self._check_size(dataset_dict, image)
        if mismatch is not None:
            return self._reject(dataset_dict, SIZE_MISMATCH, mismatch)
        self._in_a_row, self._mapped_any = 0, True
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
