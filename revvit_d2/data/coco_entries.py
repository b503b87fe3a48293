"""Checks of one entry of a COCO json (an image, a box, a segmentation), in words: what
:mod:`revvit_d2.data.coco_json` reports. Pure Python; the tests of ``load_coco_json`` that
detectron2 applies are followed where it has them."""
import math
from typing import Any, Optional, Tuple

__all__ = ["is_int", "is_number", "hashable", "image_problem", "box_problem",
           "segmentation_problem"]


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive_whole(x) -> bool:
    return is_number(x) and x > 0 and float(x).is_integer()


def image_problem(img) -> Optional[str]:
    if not isinstance(img, dict):
        return f"not an object: {type(img).__name__}"
    if not isinstance(img.get("id"), (int, str)) or isinstance(img.get("id"), bool):
        return f"no integer id (id {img.get('id')!r})"
    if not isinstance(img.get("file_name"), str) or not img["file_name"]:
        return f"no file_name ({img.get('file_name')!r})"
    bad = [f"{k} {img.get(k)!r}" for k in ("width", "height") if not _positive_whole(img.get(k))]
    if bad:
        return f"width and height must be positive integers: {', '.join(bad)}"
    return None


def box_problem(bbox) -> Optional[str]:
    if bbox is None:
        return "no bbox"
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"bbox must be [x, y, width, height], got {bbox!r}"[:200]
    if not _is_polygon(list(bbox)) or any(isinstance(v, bool) for v in bbox):
        return f"bbox values must be finite numbers, got {bbox!r}"[:200]
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"empty box: width {bbox[2]}, height {bbox[3]}"
    return None


def _is_polygon(p) -> bool:
    """A list of finite numbers (``sum`` runs in C: a COCO train json has 40M coordinates;
    anything but numbers raises, a NaN or an infinity gives a non-finite sum)."""
    if not isinstance(p, list):
        return False
    try:
        return math.isfinite(sum(p))
    except TypeError:
        return False


def _valid_polygon(p) -> bool:  # detectron2's load_coco_json test, on a list of numbers
    return len(p) % 2 == 0 and len(p) >= 6


def segmentation_problem(segm, img: dict) -> Tuple[Any, Optional[str], Optional[str]]:
    """``(segmentation to keep, invalid-segmentation detail, invalid-polygon detail)``.

    Follows detectron2's ``load_coco_json``: a falsy segmentation (``[]``, missing) is no
    segmentation (the annotation is kept: boxes only); a polygon list without any polygon of
    >= 3 points (even length >= 6) drops the instance; shorter polygons next to valid ones are
    removed. What would crash it or pycocotools (a flat list of numbers, polygons that are not
    lists of numbers, an RLE without ``counts`` / ``size`` or of another size than the image)
    drops the annotation too: the mapper's mask code and COCO's segm evaluation cannot use it.
    """
    if not segm:
        return segm, None, None
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not isinstance(counts, (str, list)) or not (isinstance(size, (list, tuple))
                                                       and len(size) == 2):
            return segm, f"RLE needs 'counts' and 'size' [height, width], got keys " \
                         f"{sorted(segm)}", None
        if [size[0], size[1]] != [img["height"], img["width"]]:
            return segm, (f"RLE size {list(size)} is not the image's [height, width] "
                          f"[{img['height']}, {img['width']}]"), None
        return segm, None, None
    if not isinstance(segm, list):
        return segm, f"not a polygon list or an RLE object: {type(segm).__name__}", None
    if not all([_is_polygon(p) for p in segm]):
        if not all(isinstance(p, list) for p in segm):
            hint = (" (a flat list of numbers? COCO polygons are [[x1, y1, x2, y2, ...], ...])"
                    if all(is_number(v) for v in segm) else "")
            return segm, f"polygons must be lists of numbers{hint}", None
        return segm, "a polygon holds something other than finite numbers", None
    valid = [p for p in segm if _valid_polygon(p)]
    if not valid:
        lengths = ", ".join(str(len(p)) for p in segm[:5])
        return segm, (f"no polygon with 3 or more points (numbers per polygon: {lengths}); "
                      f"detectron2's loader drops such an instance"), None
    if len(valid) < len(segm):
        return valid, None, (f"{len(segm) - len(valid)} of {len(segm)} polygons with fewer than 3 "
                             f"points or an odd length removed (as detectron2's loader does)")
    return segm, None, None


def hashable(x) -> bool:
    return isinstance(x, (int, str)) and not isinstance(x, bool)
