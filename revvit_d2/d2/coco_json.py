"""``register_coco_instances`` that cleans the json first: one bad entry never stops a run.

Same signature and metadata as detectron2's ``register_coco_instances``; the dataset function
(run when the dataset is first used, ``DatasetCatalog.get``) reads the json, cleans it
(:func:`revvit_d2.data.coco_json.clean_coco_json`), logs one line per problem reason with the
count and the first entries, and hands detectron2's ``load_coco_json`` either the original file
(nothing to clean: no copy is made) or a cleaned copy in the cache folder
(:func:`cleaned_json_path`), whose path then replaces the metadata's ``json_file`` so that
detectron2's ``COCOEvaluator`` evaluates against the same annotations. detectron2's tools and
ours build the test loader before the evaluator, so the evaluator sees the cleaned path. In a
json where only some annotations have masks, the evaluator's copy also gives the others their
box as a mask (pycocotools' mask evaluation stops on them; training keeps them as they are).
The problems are logged once per process and json.

Pure cleaning (no detectron2) and its reasons: :mod:`revvit_d2.data.coco_json`.
"""
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Set

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from revvit_d2.data.coco_json import (JSON_REASONS, NO_ANNOTATION, REPORTED_ONLY,  # noqa: F401
                                      CocoJsonError, JsonProblem, clean_coco_json,
                                      clean_coco_json_changed, for_evaluation, problem_counts,
                                      read_coco_json)
from revvit_d2.utils.io import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["register_coco_instances", "load_clean_coco_json", "cleaned_json_path",
           "default_cache_dir", "clean_coco_json", "read_coco_json", "JsonProblem",
           "JSON_REASONS", "CocoJsonError"]

#: Bump when the cleaning changes, so that older cleaned copies are not reused.
CLEANING_VERSION = 1
#: How many entries each warning names.
FIRST_FEW = 3
#: The json sources (path, mtime, size) whose problems this process has logged.
_REPORTED: Set[str] = set()

# What happens to the entries of a reason, for the log line.
_ACTION = {
    "unknown category id": "annotation(s) dropped",
    "unknown image id": "annotation(s) dropped",
    "duplicate annotation id": "annotation(s) kept with a new id",
    "missing annotation id": "annotation(s) kept with a new id",
    "duplicate image id": "image entry(ies) dropped, the first with each id kept",
    "duplicate category id": "category entry(ies) dropped, the first with each id kept",
    "malformed image entry": "image(s) dropped with their annotations",
    "malformed category entry": "category entry(ies) dropped",
    "malformed annotation entry": "annotation entry(ies) dropped",
    "bad box": "annotation(s) dropped",
    "invalid segmentation": "annotation(s) dropped",
    "invalid polygon": "annotation(s) kept without their invalid polygons",
    "no segmentation": "annotation(s) kept (their box is their mask in COCO's evaluation)",
    "ignore flag": "annotation(s) kept as iscrowd=1",
    "missing area or iscrowd": "annotation(s) completed",
    "no annotation": "image(s) kept (left out of training by detectron2, used in evaluation)",
}


def default_cache_dir() -> Path:
    """``$REVVIT_CACHE/coco_json``, default ``~/.cache/revvit/coco_json``."""
    root = os.environ.get("REVVIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "revvit")
    return Path(root) / "coco_json"


def _source_key(json_file) -> str:
    path = os.path.abspath(os.fspath(json_file))
    st = os.stat(path)
    return f"{path}\0{st.st_mtime_ns}\0{st.st_size}\0{CLEANING_VERSION}"


def cleaned_json_path(json_file, cache_dir=None, kind: str = "") -> Path:
    """Where the cleaned copy of `json_file` goes: ``<cache>/<sha1>.json``, the hash of the
    json's absolute path, modification time and size (a changed json gets a new copy);
    ``<sha1>.eval.json`` (`kind` ``"eval"``) for the copy COCO's evaluation reads when it
    differs (:func:`revvit_d2.data.coco_json.for_evaluation`)."""
    digest = hashlib.sha1(_source_key(json_file).encode("utf-8", "surrogateescape")).hexdigest()
    name = f"{digest}.{kind}.json" if kind else f"{digest}.json"
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / name


def log_problems(problems: List[JsonProblem], source: str) -> None:
    """One line per reason: the count, what was done, the first few entries (the first with
    its detail). ``no annotation`` at INFO (every COCO split has such images), others WARNING.
    """
    by_reason: Dict[str, List[JsonProblem]] = {}
    for p in problems:
        by_reason.setdefault(p.reason, []).append(p)
    prefix = f"{source}:"
    for reason in sorted(by_reason, key=lambda r: (JSON_REASONS + (r,)).index(r)):
        items = by_reason[reason]
        names = [p.where[len(prefix):] if p.where.startswith(prefix) else p.where
                 for p in items[:FIRST_FEW]]
        names[0] = f"{names[0]} ({items[0].detail})"
        more = f", ... ({len(items) - FIRST_FEW} more)" if len(items) > FIRST_FEW else ""
        level = logging.INFO if reason == NO_ANNOTATION else logging.WARNING
        logger.log(level, "COCO json %s: %s: %d %s: %s%s", source, reason, len(items),
                   _ACTION.get(reason, "entries"), ", ".join(names), more)


def _write_cleaned(cleaned: dict, path: Path) -> str:
    """Write `cleaned` to `path` atomically unless it is there already; its path."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file():  # same name = same source and cleaning: reuse it
            with atomic_write(path, "w") as f:
                json.dump(cleaned, f)
    except OSError as e:
        raise CocoJsonError(f"cannot write the cleaned COCO json to {path} ({e}); set "
                            f"REVVIT_CACHE to a writable folder") from None
    return str(path)


def load_clean_coco_json(json_file, image_root, dataset_name: Optional[str] = None,
                         extra_annotation_keys=None, cache_dir=None) -> List[dict]:
    """detectron2's ``load_coco_json`` on the cleaned json (see the module docstring).

    The problems are logged the first time this process loads a json (a dataset is loaded
    again for each data loader). When `dataset_name` is given, its ``json_file`` metadata is
    set to the file COCO's evaluation should read: the source when it needs nothing, else the
    cleaned copy (or its evaluation variant). :class:`CocoJsonError` (one line) when the json
    cannot be read or nothing in it is usable (no image or no category left).
    """
    source = os.fspath(json_file)
    data = read_coco_json(source)
    key = _source_key(source)
    cleaned, problems, changed = clean_coco_json_changed(data, source)
    first = key not in _REPORTED
    if first:
        log_problems(problems, source)
        _REPORTED.add(key)
    if not cleaned["images"] or not cleaned["categories"]:
        counts = problem_counts(problems)
        what = ", ".join(f"{n} {r}" for r, n in counts.items()) or "the lists are empty"
        raise CocoJsonError(f"no usable {'image' if not cleaned['images'] else 'category'} in "
                            f"the COCO json {source} ({what})")
    use = source
    if changed:
        use = _write_cleaned(cleaned, cleaned_json_path(source, cache_dir))
    evaluate = for_evaluation(cleaned)
    eval_file = use if evaluate is None else _write_cleaned(
        evaluate, cleaned_json_path(source, cache_dir, "eval"))
    del data, cleaned, evaluate
    if first and (use != source or eval_file != use):
        fixed = sum(n for r, n in problem_counts(problems).items() if r not in REPORTED_ONLY)
        logger.info("COCO json %s: %d entries fixed; training reads %s, evaluation %s", source,
                    fixed, use, eval_file)
    if dataset_name is not None:
        meta = MetadataCatalog.get(dataset_name)
        if meta.get("json_file") != eval_file:
            if hasattr(meta, "json_file"):  # Metadata refuses to change a value in place
                delattr(meta, "json_file")
            meta.json_file = eval_file
    return load_coco_json(use, image_root, dataset_name, extra_annotation_keys)


def register_coco_instances(name: str, metadata: dict, json_file, image_root) -> None:
    """detectron2's ``register_coco_instances`` (same arguments, same metadata:
    ``json_file``, ``image_root``, ``evaluator_type="coco"``, then ``thing_classes`` and
    ``thing_dataset_id_to_contiguous_id`` from ``load_coco_json``), with the json cleaned when
    the dataset is loaded (:func:`load_clean_coco_json`): unknown category or image ids,
    duplicate ids, malformed entries, bad boxes and invalid segmentations are dropped or
    mended with one warning per reason instead of stopping the run. ``source_json_file`` keeps
    the original path when ``json_file`` is switched to the cleaned copy (the preflight check
    reads the original).
    """
    assert isinstance(name, str), name
    assert isinstance(json_file, (str, os.PathLike)), json_file
    assert isinstance(image_root, (str, os.PathLike)), image_root
    DatasetCatalog.register(name, lambda: load_clean_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, source_json_file=json_file,
                                  image_root=image_root, evaluator_type="coco", **metadata)
