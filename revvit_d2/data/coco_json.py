"""A user's COCO json, cleaned of the entries that stop detectron2 (no detectron2 needed here).

detectron2's ``load_coco_json`` stops the whole run for one bad entry: an annotation whose
``category_id`` is not in ``categories`` (``KeyError``), duplicate annotation ids
(``AssertionError``), an empty ``bbox`` (``ValueError``), an ``ignore`` flag; a missing or NaN box
crashes later in the mapper, and COCO's evaluation (pycocotools) crashes on annotations without
``area`` / ``iscrowd`` or with a segmentation it cannot rasterise (or none, when it evaluates
masks). :func:`clean_coco_json` returns a copy of the parsed json without them and a
:class:`JsonProblem` per entry it dropped, renumbered or filled in (:data:`JSON_REASONS`);
:func:`for_evaluation` the variant COCO's mask evaluation needs; :func:`read_coco_json` reads
the file with one-line errors.

The registration that uses it (a drop-in for detectron2's ``register_coco_instances``) is
:mod:`revvit_d2.d2.coco_json`; the preflight check (tools/check_dataset.py) reports the same
problems before a run.
"""
import collections
import json
import os
from typing import Dict, List, NamedTuple, Optional, Tuple

from revvit_d2.data.coco_entries import (box_problem, hashable, image_problem, is_int, is_number,
                                         segmentation_problem)
from revvit_d2.utils.errors import UserError

__all__ = [
    "CocoJsonError", "JsonProblem", "JSON_REASONS", "DROPPED_REASONS", "REPORTED_ONLY",
    "clean_coco_json", "clean_coco_json_changed", "for_evaluation", "problem_counts",
    "read_coco_json", "UNKNOWN_CATEGORY", "UNKNOWN_IMAGE", "DUPLICATE_ANNOTATION_ID",
    "MISSING_ANNOTATION_ID", "DUPLICATE_IMAGE_ID", "DUPLICATE_CATEGORY_ID", "MALFORMED_IMAGE",
    "MALFORMED_CATEGORY", "MALFORMED_ANNOTATION", "BAD_BOX", "INVALID_SEGMENTATION",
    "INVALID_POLYGON", "IGNORE_FLAG", "MISSING_AREA_OR_ISCROWD", "NO_SEGMENTATION",
    "NO_ANNOTATION",
]

# Reasons, in the order problems of an entry are checked. What happens to the entry follows.
UNKNOWN_CATEGORY = "unknown category id"            # annotation dropped
UNKNOWN_IMAGE = "unknown image id"                  # annotation dropped
DUPLICATE_ANNOTATION_ID = "duplicate annotation id"  # kept with a fresh id
MISSING_ANNOTATION_ID = "missing annotation id"     # kept with a fresh id (pycocotools: KeyError)
DUPLICATE_IMAGE_ID = "duplicate image id"           # later entries dropped
DUPLICATE_CATEGORY_ID = "duplicate category id"     # later entries dropped
MALFORMED_IMAGE = "malformed image entry"           # image dropped with its annotations
MALFORMED_CATEGORY = "malformed category entry"     # no integer id or no name: dropped
MALFORMED_ANNOTATION = "malformed annotation entry"  # not an object: dropped
BAD_BOX = "bad box"                                 # annotation dropped
INVALID_SEGMENTATION = "invalid segmentation"       # annotation dropped (as detectron2 does)
INVALID_POLYGON = "invalid polygon"                 # the polygon removed, annotation kept
IGNORE_FLAG = "ignore flag"                         # kept as iscrowd=1, "ignore" removed
MISSING_AREA_OR_ISCROWD = "missing area or iscrowd"  # filled: box area, iscrowd 0
NO_SEGMENTATION = "no segmentation"                 # kept; see for_evaluation
NO_ANNOTATION = "no annotation"                     # image kept: reported only

#: Every reason :func:`clean_coco_json` reports.
JSON_REASONS = (UNKNOWN_CATEGORY, UNKNOWN_IMAGE, DUPLICATE_ANNOTATION_ID, MISSING_ANNOTATION_ID,
                DUPLICATE_IMAGE_ID, DUPLICATE_CATEGORY_ID, MALFORMED_IMAGE, MALFORMED_CATEGORY,
                MALFORMED_ANNOTATION, BAD_BOX, INVALID_SEGMENTATION, INVALID_POLYGON,
                IGNORE_FLAG, MISSING_AREA_OR_ISCROWD, NO_SEGMENTATION, NO_ANNOTATION)
#: The reasons that leave the entry as it is in the cleaned json.
REPORTED_ONLY = (NO_SEGMENTATION, NO_ANNOTATION)
#: The reasons whose entry is left out of the cleaned json.
DROPPED_REASONS = (UNKNOWN_CATEGORY, UNKNOWN_IMAGE, DUPLICATE_IMAGE_ID, DUPLICATE_CATEGORY_ID,
                   MALFORMED_IMAGE, MALFORMED_CATEGORY, MALFORMED_ANNOTATION, BAD_BOX,
                   INVALID_SEGMENTATION)


class CocoJsonError(UserError, ValueError):
    """A COCO json that cannot be used at all (missing, not json, not a COCO dict, nothing
    usable in it); the message is one line."""


class JsonProblem(NamedTuple):
    """One entry of a COCO json that could not be used as it is.

    ``where``: ``"<json path>:annotation <id>"``, ``":image <id>"`` or ``":category <id>"``
    (``#<n>``, the 0-based position in its list, for an entry without a usable id);
    ``reason``: one of :data:`JSON_REASONS`; ``detail``: what is wrong, and what was done when
    that is not implied by the reason.
    """
    where: str
    reason: str
    detail: str


def read_coco_json(path) -> dict:
    """The parsed COCO json at `path`; :class:`CocoJsonError` (one line) when the file is
    missing, not json, or not a COCO dict (an object with ``images`` and ``categories`` lists;
    ``annotations``, when present, a list: an image-info json such as COCO's test-dev has
    none)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CocoJsonError(f"COCO json not found: {path}")
    if not os.path.isfile(path):
        raise CocoJsonError(f"COCO json is not a file: {path}")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CocoJsonError(f"{path} is not a json file ({e})") from None
    except (UnicodeDecodeError, OSError) as e:
        raise CocoJsonError(f"cannot read the COCO json {path}: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise CocoJsonError(f"{path} is not a COCO json: it holds a {type(data).__name__}, not "
                            f"an object with 'images', 'annotations' and 'categories'")
    missing = [k for k in ("images", "categories") if not isinstance(data.get(k), list)]
    if "annotations" in data and not isinstance(data["annotations"], list):
        missing.append("annotations")
    if missing:
        raise CocoJsonError(f"{path} is not a COCO json: no {' / '.join(repr(k) for k in missing)}"
                            f" list")
    return data


def clean_coco_json(data: dict, source: str = "") -> Tuple[dict, List[JsonProblem]]:
    """The entries of a parsed COCO json that detectron2 or pycocotools cannot use, removed or
    mended; and one :class:`JsonProblem` per such entry.

    Args:
        data: the parsed json (:func:`read_coco_json`); not modified.
        source: the json's path, the prefix of each problem's ``where``.

    Returns:
        ``(cleaned, problems)``: a new dict (other top-level keys kept; changed entries are
        copies, unchanged ones the input's objects) and the problems in a stable order:
        categories, images, annotations (each in json order; then the id fixes, then the
        annotations without a mask among annotations with one), then images without
        annotation.
        Reasons and what is done (:data:`JSON_REASONS`): entries with an unknown category or
        image id, a bad box (missing, not 4 finite numbers, width or height <= 0), an invalid
        segmentation (see :func:`_segmentation`) or that are not objects are dropped;
        duplicate image / category ids keep the first entry; malformed images (no
        ``file_name``, width / height not positive integers) are dropped with their
        annotations; duplicate or missing annotation ids get fresh ones; ``ignore: 1`` becomes
        ``iscrowd: 1`` (detectron2 refuses ``ignore``; COCO's evaluation reads it as crowd);
        missing ``area`` (the box's) and ``iscrowd`` (0) are filled in for COCO's evaluation;
        annotations without a mask in a json whose other annotations have one, and images
        left without annotation, are reported only (:data:`REPORTED_ONLY`; detectron2 leaves
        such images out of training itself, evaluation keeps them; for the masks see
        :func:`for_evaluation`).
    """
    cleaned, problems, _ = clean_coco_json_changed(data, source)
    return cleaned, problems


def _ident(entry, index):
    """An entry's id, or ``#<index>`` when it has no usable one."""
    has = isinstance(entry, dict) and isinstance(entry.get("id"), (int, str)) \
        and not isinstance(entry.get("id"), bool)
    return entry["id"] if has else f"#{index}"


class _Cleaning:
    """One pass of :func:`clean_coco_json_changed`: a method per list of the json, the problems
    collected in order."""

    def __init__(self, data: dict, source: str):
        self.data = data
        self.prefix = f"{source}:" if source else ""
        self.problems: List[JsonProblem] = []
        self.changed_anns = 0  # annotations mended or renumbered

    def report(self, kind: str, ident, reason: str, detail: str):
        self.problems.append(JsonProblem(f"{self.prefix}{kind} {ident}", reason, detail))

    def categories(self):
        """An integer id and a name each (detectron2 sorts the ids and reads the names)."""
        categories, cat_ids = [], set()
        for i, c in enumerate(self.data.get("categories") or []):
            if not isinstance(c, dict) or not is_int(c.get("id")) \
                    or not isinstance(c.get("name"), str):
                what = (f"not an object: {type(c).__name__}" if not isinstance(c, dict) else
                        f"needs an integer id and a name, got id {c.get('id')!r}, "
                        f"name {c.get('name')!r}")
                self.report("category", _ident(c, i), MALFORMED_CATEGORY, what)
            elif c["id"] in cat_ids:
                self.report("category", c["id"], DUPLICATE_CATEGORY_ID,
                            f"{c.get('name')!r} dropped; the first category with this id is "
                            f"kept")
            else:
                cat_ids.add(c["id"])
                categories.append(c)
        return categories, cat_ids

    def images(self, per_image):
        """The usable images, by id, and the ids of dropped ones (whose annotations go with
        them, told with the image: `per_image` counts them)."""
        images, image_by_id, dropped_image_ids = [], {}, set()
        for i, img in enumerate(self.data.get("images") or []):
            why = image_problem(img)
            if why is not None:
                has_id = isinstance(img, dict) and hashable(img.get("id"))
                n = per_image.get(img.get("id"), 0) if has_id else 0
                if has_id and img.get("id") not in image_by_id:
                    dropped_image_ids.add(img.get("id"))
                self.report("image", _ident(img, i), MALFORMED_IMAGE,
                            f"{why}; dropped with its {n} annotation(s)" if n else why)
            elif img["id"] in image_by_id:
                self.report("image", img["id"], DUPLICATE_IMAGE_ID,
                            f"{img.get('file_name')!r} dropped; the first image with this id "
                            f"({image_by_id[img['id']].get('file_name')!r}) is kept")
            else:
                image_by_id[img["id"]] = img
                images.append(img)
        return images, image_by_id, dropped_image_ids - set(image_by_id)

    def annotations(self, raw_anns, image_by_id, dropped_image_ids, cat_ids):
        """The usable annotations (mended where they can be) and their positions in the
        input."""
        annotations, positions = [], []
        for i, a in enumerate(raw_anns):
            aid = _ident(a, i) if not isinstance(a, dict) or not is_int(a.get("id")) \
                else a["id"]
            if not isinstance(a, dict):
                self.report("annotation", aid, MALFORMED_ANNOTATION,
                            f"not an object: {type(a).__name__}")
                continue
            image_id = a.get("image_id")
            if hashable(image_id) and image_id in dropped_image_ids:
                continue  # told with the image
            if not hashable(image_id) or image_id not in image_by_id:
                self.report("annotation", aid, UNKNOWN_IMAGE,
                            f"image_id {image_id!r} is not an image")
                continue
            if not is_int(a.get("category_id")) or a["category_id"] not in cat_ids:
                self.report("annotation", aid, UNKNOWN_CATEGORY,
                            f"category_id {a.get('category_id')!r} is not in 'categories'")
                continue
            why = box_problem(a.get("bbox"))
            if why is not None:
                self.report("annotation", aid, BAD_BOX, why)
                continue
            segm, invalid, partly = segmentation_problem(a.get("segmentation"), image_by_id[image_id])
            if invalid is not None:
                self.report("annotation", aid, INVALID_SEGMENTATION, invalid)
                continue
            mended = self._mend(a, aid, segm, partly)
            if mended:
                a = {k: v for k, v in a.items() if k != "ignore"}
                a.update(mended)
                self.changed_anns += 1
            annotations.append(a)
            positions.append(i)
        return annotations, positions

    def _mend(self, a, aid, segm, partly) -> dict:
        """What a usable annotation needs changed: its polygons, ``ignore``, area, iscrowd."""
        mended = {}
        if partly is not None:
            self.report("annotation", aid, INVALID_POLYGON, partly)
            mended["segmentation"] = segm
        if a.get("ignore", 0):
            self.report("annotation", aid, IGNORE_FLAG,
                        f"ignore {a['ignore']!r}: kept as iscrowd=1 (detectron2 refuses "
                        f"'ignore'; COCO's evaluation reads it as a crowd region)")
            mended["iscrowd"] = 1
        missing = [k for k in ("area", "iscrowd") if k not in a and k not in mended
                   or k == "area" and not is_number(a.get("area"))]
        if missing:
            w, h = a["bbox"][2], a["bbox"][3]
            if "area" in missing:
                mended["area"] = float(w) * float(h)
            if "iscrowd" in missing:
                mended["iscrowd"] = 0
            self.report("annotation", aid, MISSING_AREA_OR_ISCROWD,
                        "filled in: " + ", ".join(f"{k} {mended[k]!r}" for k in missing)
                        + (" (the box's area)" if "area" in missing else ""))
        return mended

    def renumber(self, annotations, positions, raw_anns) -> None:
        """Unique integer annotation ids (pycocotools indexes by id, detectron2 asserts).
        Fresh ids are above every id of the input, dropped entries' included (no confusion)."""
        taken = {a["id"] for a in raw_anns if isinstance(a, dict) and is_int(a.get("id"))}
        next_id = max(taken, default=0) + 1
        seen = set()
        for k, a in enumerate(annotations):
            aid = a.get("id")
            if is_int(aid) and aid not in seen:
                seen.add(aid)
                continue
            while next_id in taken:
                next_id += 1
            if is_int(aid):
                self.report("annotation", aid, DUPLICATE_ANNOTATION_ID,
                            f"id {aid} is used by an earlier annotation; this one (image "
                            f"{a['image_id']}) is kept with the new id {next_id}")
            else:
                self.report("annotation", f"#{positions[k]}", MISSING_ANNOTATION_ID,
                            f"id {aid!r} is not an integer; kept with the new id {next_id}")
            annotations[k] = dict(a, id=next_id)
            taken.add(next_id)
            seen.add(next_id)
            self.changed_anns += 1

    def report_only(self, annotations, images, per_image) -> None:
        """:data:`REPORTED_ONLY` reasons. Annotations without a mask among annotations with one:
        training keeps them (boxes; the mapper drops them when masks are trained), COCO's segm
        evaluation cannot rasterise them. Images without annotation."""
        if any(a.get("segmentation") for a in annotations):
            for a in annotations:
                if not a.get("segmentation"):
                    self.report("annotation", a["id"], NO_SEGMENTATION,
                                "other annotations have one: boxes train on it, masks do not "
                                "(the mapper drops it); COCO's mask evaluation takes its box as "
                                "its mask")
        with_anns = {a["image_id"] for a in annotations}
        for img in images:
            if img["id"] not in with_anns:
                n = per_image.get(img["id"], 0)
                self.report("image", img["id"], NO_ANNOTATION,
                            f"its {n} annotation(s) were dropped" if n else "none in the json")


def clean_coco_json_changed(data: dict, source: str = ""
                            ) -> Tuple[dict, List[JsonProblem], bool]:
    """:func:`clean_coco_json` and whether the cleaned json differs from `data` (an entry was
    dropped, renumbered or mended: a reason not in :data:`REPORTED_ONLY`)."""
    run = _Cleaning(data, source)
    categories, cat_ids = run.categories()
    raw_anns = data.get("annotations") or []
    per_image = collections.Counter(a.get("image_id") for a in raw_anns
                                    if isinstance(a, dict) and isinstance(a.get("image_id"),
                                                                          (int, str)))
    images, image_by_id, dropped_image_ids = run.images(per_image)
    annotations, positions = run.annotations(raw_anns, image_by_id, dropped_image_ids, cat_ids)
    run.renumber(annotations, positions, raw_anns)
    changed = bool(run.problems) or run.changed_anns > 0
    run.report_only(annotations, images, per_image)  # (these do not make the json change)

    cleaned = {k: v for k, v in data.items()
               if k not in ("images", "annotations", "categories")}
    cleaned.update(images=images, annotations=annotations, categories=categories)
    if "annotations" not in data and not annotations:
        del cleaned["annotations"]
    return cleaned, run.problems, changed


def for_evaluation(cleaned: dict) -> Optional[dict]:
    """The cleaned json as COCO's evaluation needs it, or None when it needs nothing more.

    pycocotools' mask evaluation (``COCOeval(iouType="segm")``, which detectron2's
    ``COCOEvaluator`` runs for a mask model) rasterises every ground-truth annotation and stops
    on one without a segmentation (``KeyError`` / ``IndexError``). In a json where some
    annotations have masks (:data:`NO_SEGMENTATION`), the others get their box as a polygon
    here; the training json keeps them as they are.
    """
    anns = cleaned.get("annotations") or []
    if not any(a.get("segmentation") for a in anns) or all(a.get("segmentation") for a in anns):
        return None
    out = dict(cleaned)
    out["annotations"] = [a if a.get("segmentation") else dict(a, segmentation=[_box_polygon(
        a["bbox"])]) for a in anns]
    return out


def _box_polygon(bbox) -> List[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def problem_counts(problems: List[JsonProblem]) -> Dict[str, int]:
    """``{reason: number of entries}``, in :data:`JSON_REASONS` order."""
    counts = collections.Counter(p.reason for p in problems)
    return {r: counts[r] for r in JSON_REASONS if counts[r]}
