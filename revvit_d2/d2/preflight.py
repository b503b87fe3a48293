"""Preflight check of a COCO-format dataset (``tools/check_dataset.py``): the json's entries as
:func:`~revvit_d2.d2.coco_json.clean_coco_json` judges them for training, and every image
decoded as :class:`~revvit_d2.d2.data.SafeDatasetMapper` decodes it (EXIF rotation, 16-bit
grayscale), its size compared with the json's. The report and worker machinery:
:mod:`revvit_d2.data.preflight`.
"""
import os
from typing import List, Optional, Sequence, Tuple

from detectron2.data import MetadataCatalog

from revvit_d2.data.preflight import (ERROR, WARNING, Finding, PreflightReport,
                                      check_image_file, check_in_parallel)
from revvit_d2.data.coco_json import DROPPED_REASONS, clean_coco_json, read_coco_json
from revvit_d2.d2.data import read_image_3ch
from revvit_d2.utils.errors import UserError

__all__ = ["check_coco", "coco_sources"]

def _read_rgb(path: str):
    return read_image_3ch(path, "RGB")


def _check_coco_image(item: Tuple[str, Tuple[int, int]]) -> List[Finding]:
    path, declared = item
    return check_image_file(path, declared, reader=_read_rgb)


def check_coco(json_file: str, image_root: str, workers: int = 0,
               progress: Optional[bool] = None, name: Optional[str] = None) -> PreflightReport:
    """The problems of a COCO json and its images: json entries that training drops
    (:data:`~revvit_d2.data.coco_json.DROPPED_REASONS`: errors) or keeps after a repair or with
    a doubt (renumbered duplicate ids, removed invalid polygons, images without annotations:
    warnings), then each image file of the usable entries: missing, unreadable, or of another
    size than the json's ``width`` x ``height``."""
    data = read_coco_json(json_file)
    cleaned, problems = clean_coco_json(data, str(json_file))
    report = PreflightReport(name or f"coco: {json_file}", "coco",
                             {"json_file": str(json_file), "image_root": str(image_root)})
    report.extend(Finding(p.where, p.reason, p.detail,
                          ERROR if p.reason in DROPPED_REASONS else WARNING) for p in problems)
    images = [(os.path.join(str(image_root), im["file_name"]), (im["width"], im["height"]))
              for im in cleaned["images"]]
    report.entries = len(data.get("images", [])) + len(data.get("annotations", []))
    report.extend(check_in_parallel(_check_coco_image, images, workers, "images", progress))
    return report


def coco_sources(names: Sequence[str]) -> List[Tuple[str, str, str]]:
    """``(name, json_file, image_root)`` of datasets registered in detectron2's catalogs from a
    COCO json (``register_coco_instances``, ours or detectron2's)."""
    out = []
    for n in names:
        meta = MetadataCatalog.get(n)
        json_file = meta.get("source_json_file", None) or meta.get("json_file", None)
        image_root = meta.get("image_root", None)
        if not json_file or image_root is None:
            raise UserError(f"dataset {n!r} is not registered from a COCO json (its metadata "
                            f"has no json_file / image_root); check_dataset checks COCO-format "
                            f"datasets only")
        out.append((n, str(json_file), str(image_root)))
    return out
