"""A user's COCO json with entries that stop detectron2 (unknown category or image ids,
duplicate ids, malformed entries, bad boxes, invalid segmentations...): revvit's
``register_coco_instances`` cleans it, reports each problem reason once with its count, loads the
rest, and points the evaluator's ``json_file`` at the cleaned copy; stock detectron2 stops on
the same json. No training, no image files needed (nothing here reads an image)."""
import contextlib
import io
import json
import logging
import math

import pytest

pytest.importorskip("detectron2")

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets import load_coco_json  # noqa: E402
from detectron2.data.datasets import register_coco_instances as d2_register  # noqa: E402

from revvit_d2.d2 import register_coco_instances  # noqa: E402
from revvit_d2.d2.coco_json import cleaned_json_path, load_clean_coco_json  # noqa: E402
from revvit_d2.data.coco_json import (JSON_REASONS, CocoJsonError, JsonProblem,  # noqa: E402
                                      clean_coco_json, read_coco_json)

POLY = [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]]


def _img(i, name=None, w=20, h=20):
    return {"id": i, "file_name": name or f"{i}.png", "width": w, "height": h}


def _ann(i, image_id=1, cat=1, bbox=(2.0, 2.0, 10.0, 10.0), **kw):
    a = {"id": i, "image_id": image_id, "category_id": cat, "iscrowd": 0, "area": 100.0,
         "segmentation": POLY}
    if bbox is not None:
        a["bbox"] = list(bbox)
    a.update(kw)
    return a


def broken_json():
    """One entry (at least) of every problem kind, and the problems expected (where, reason)."""
    anns = [
        _ann(1),                                            # good
        _ann(2, cat=9),                                     # unknown category id
        _ann(3, image_id=99),                               # unknown image id
        _ann(1, image_id=2, cat=2),                         # duplicate annotation id -> 17
        _ann(5, image_id=2, bbox=None),                     # bad box: none
        _ann(6, image_id=2, bbox=(1, 2, 0, 3)),             # bad box: zero width
        _ann(7, image_id=2, bbox=(1, 2, float("nan"), 3)),  # bad box: NaN
        _ann(8, image_id=2, segmentation=[[1.0, 2.0, 3.0, 4.0]]),  # no polygon of 3 points
        _ann(9, image_id=2, segmentation={"size": [5, 5], "counts": "abc"}),  # RLE of 5x5
        _ann(10, image_id=4),                               # on a malformed image
        {k: v for k, v in _ann(11).items() if k not in ("area", "iscrowd")},  # area, iscrowd
        _ann(12, ignore=1),                                 # ignore flag
        {k: v for k, v in _ann(0).items() if k != "id"},    # missing annotation id -> 18
        "junk",                                             # malformed annotation entry
        _ann(15, segmentation=POLY + [[1.0, 2.0]]),         # one invalid polygon
        _ann(16, image_id=6, bbox=(0, 0, -1, 4)),           # image 6's only annotation
        _ann(13, image_id=2, segmentation=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),  # flat list
        _ann(14, segmentation=[]),                          # no mask among masks
    ]
    data = {
        "info": {"description": "broken on purpose"},
        "images": [_img(1), _img(2), _img(3), _img(2, "2b.png"), _img(4, w=0),
                   {"id": 5, "width": 20, "height": 20}, _img(6)],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 2, "name": "b2"},
                       {"id": "x"}],
        "annotations": anns,
    }
    expected = [
        ("category 2", "duplicate category id"),
        ("category x", "malformed category entry"),
        ("image 2", "duplicate image id"),
        ("image 4", "malformed image entry"),
        ("image 5", "malformed image entry"),
        ("annotation 2", "unknown category id"),
        ("annotation 3", "unknown image id"),
        ("annotation 5", "bad box"),
        ("annotation 6", "bad box"),
        ("annotation 7", "bad box"),
        ("annotation 8", "invalid segmentation"),
        ("annotation 9", "invalid segmentation"),
        ("annotation 11", "missing area or iscrowd"),
        ("annotation 12", "ignore flag"),
        ("annotation #13", "malformed annotation entry"),
        ("annotation 15", "invalid polygon"),
        ("annotation 16", "bad box"),
        ("annotation 13", "invalid segmentation"),
        ("annotation 1", "duplicate annotation id"),
        ("annotation #12", "missing annotation id"),
        ("annotation 14", "no segmentation"),
        ("image 3", "no annotation"),
        ("image 6", "no annotation"),
    ]
    return data, expected


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("REVVIT_CACHE", str(d))
    return d / "coco_json"


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


@contextlib.contextmanager
def _registered(name, *args, register=register_coco_instances):
    register(name, {}, *args)
    try:
        yield name
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_every_problem_found_once_in_a_stable_order():
    data, expected = broken_json()
    before = json.dumps(data)
    cleaned, problems = clean_coco_json(data, "x.json")
    assert json.dumps(data) == before  # input untouched
    assert all(isinstance(p, JsonProblem) and p.reason in JSON_REASONS for p in problems)
    assert [(p.where, p.reason) for p in problems] == [(f"x.json:{w}", r) for w, r in expected]
    assert {r for _, r in expected} == set(JSON_REASONS)  # the json has every kind
    by = {(p.where, p.reason): p.detail for p in problems}
    assert "kept with the new id 17" in by[("x.json:annotation 1", "duplicate annotation id")]
    assert "new id 18" in by[("x.json:annotation #12", "missing annotation id")]
    assert "dropped with its 1 annotation(s)" in by[("x.json:image 4", "malformed image entry")]
    assert "flat list of numbers" in by[("x.json:annotation 13", "invalid segmentation")]
    assert "RLE size [5, 5]" in by[("x.json:annotation 9", "invalid segmentation")]
    assert "its 1 annotation(s) were dropped" in by[("x.json:image 6", "no annotation")]
    assert clean_coco_json(data, "x.json") == (cleaned, problems)  # deterministic

    assert [i["file_name"] for i in cleaned["images"]] == ["1.png", "2.png", "3.png", "6.png"]
    assert cleaned["categories"] == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    assert cleaned["info"] == data["info"]
    anns = {a["id"]: a for a in cleaned["annotations"]}
    assert sorted(anns) == [1, 11, 12, 14, 15, 17, 18]
    assert anns[14]["segmentation"] == []  # training keeps it as it is
    assert anns[17]["image_id"] == 2 and anns[18]["image_id"] == 1
    assert anns[11]["area"] == 100.0 and anns[11]["iscrowd"] == 0
    assert anns[12]["iscrowd"] == 1 and "ignore" not in anns[12]
    assert anns[15]["segmentation"] == POLY


def test_a_clean_json_has_no_problem_and_is_unchanged():
    data = {"images": [_img(1), _img(2)], "categories": [{"id": 1, "name": "a"}],
            "annotations": [_ann(1), _ann(2, image_id=2)]}
    cleaned, problems = clean_coco_json(data)
    assert problems == [] and cleaned == data and cleaned is not data


@pytest.mark.parametrize("text, match", [
    (None, "COCO json not found"),
    ("{not json", "is not a json file"),
    ("[1, 2]", "holds a list"),
    ('{"images": [], "annotations": {}}', "no 'categories' / 'annotations' list"),
])
def test_read_errors_are_one_line(tmp_path, text, match):
    path = tmp_path / "a.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(CocoJsonError, match=match) as e:
        read_coco_json(path)
    assert "\n" not in str(e.value)


def test_stock_detectron2_stops_where_the_cleaned_dataset_loads(tmp_path, cache, caplog):
    data, expected = broken_json()
    path = _write(tmp_path / "train.json", data)
    with _registered("broken_stock", str(path), str(tmp_path), register=d2_register):
        with pytest.raises((KeyError, AssertionError, TypeError, ValueError)):
            DatasetCatalog.get("broken_stock")
    caplog.set_level(logging.INFO, logger="revvit_d2.d2.coco_json")
    with _registered("broken_own", str(path), str(tmp_path)) as name:
        dicts = DatasetCatalog.get(name)
        records = list(caplog.records)
        meta = MetadataCatalog.get(name)
        # Images 1, 2, 3, 6; annotations 1, 11, 12, 14, 15, 18 on image 1, 17 on image 2.
        assert [d["image_id"] for d in dicts] == [1, 2, 3, 6]
        assert [len(d["annotations"]) for d in dicts] == [6, 1, 0, 0]
        assert ["segmentation" in a for a in dicts[0]["annotations"]] == [True] * 5 + [False]
        assert meta.thing_classes == ["a", "b"] and meta.evaluator_type == "coco"
        # Training reads the cleaned copy; the evaluator its variant where 14 has its box as
        # its mask (pycocotools' mask evaluation stops on an annotation without one).
        assert sorted(p.name for p in cache.iterdir()) == sorted(
            [cleaned_json_path(path).name, cleaned_json_path(path, kind="eval").name])
        assert meta.json_file == str(cleaned_json_path(path, kind="eval"))
        assert meta.image_root == str(tmp_path)
        assert DatasetCatalog.get(name) == dicts  # loads again (same metadata), no new log
        assert len(caplog.records) == len(records)
    lines = [r for r in records if r.name == "revvit_d2.d2.coco_json"]
    warned = [r.getMessage() for r in lines if r.levelno == logging.WARNING]
    reasons = {r for _, r in expected}
    assert len(warned) == len(reasons) - 1  # one per reason, "no annotation" at INFO
    assert any(": bad box: 4 annotation(s) dropped: annotation 5 (no bbox), annotation 6, "
               "annotation 7, ... (1 more)" in m for m in warned), warned
    info = [r.getMessage() for r in lines if r.levelno == logging.INFO]
    assert any(": no annotation: 2 image(s) kept" in m for m in info), info

    # COCO's box and mask evaluation run on the evaluator's copy: the ground truth as
    # detections gives AP 1.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    for iou_type in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(meta.json_file)
            dets = gt.loadRes([{"image_id": a["image_id"], "category_id": a["category_id"],
                                "bbox": a["bbox"], "segmentation": a["segmentation"],
                                "score": 1.0}
                               for a in gt.dataset["annotations"] if not a["iscrowd"]])
            ev = COCOeval(gt, dets, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert math.isclose(ev.stats[0], 1.0), iou_type


@pytest.mark.parametrize("case", ["unknown category", "duplicate annotation id", "empty bbox",
                                  "ignore flag", "flat polygon"])
def test_each_stock_failure_alone(tmp_path, cache, case):
    """Each problem alone stops stock detectron2's loader; revvit's loads the rest."""
    anns = [_ann(1), _ann(2)]
    if case == "unknown category":
        anns[1]["category_id"] = 7
    elif case == "duplicate annotation id":
        anns[1]["id"] = 1
    elif case == "empty bbox":
        anns[1]["bbox"] = []
    elif case == "ignore flag":
        anns[1]["ignore"] = 1
    else:
        anns[1]["segmentation"] = [2.0, 2.0, 12.0, 2.0, 12.0, 12.0]
    data = {"images": [_img(1)], "categories": [{"id": 1, "name": "a"}], "annotations": anns}
    path = _write(tmp_path / "one.json", data)
    with pytest.raises((KeyError, AssertionError, ValueError, TypeError)):
        load_coco_json(str(path), str(tmp_path), "stock_one")
    MetadataCatalog.remove("stock_one")
    dicts = load_clean_coco_json(str(path), str(tmp_path))
    kept = 1 if case in ("unknown category", "empty bbox", "flat polygon") else 2
    assert len(dicts) == 1 and len(dicts[0]["annotations"]) == kept


def test_no_copy_for_a_clean_json(tmp_path, cache):
    data = {"images": [_img(1), _img(2)], "categories": [{"id": 1, "name": "a"}],
            "annotations": [_ann(1)]}  # image 2 without annotation: reported, not a change
    path = _write(tmp_path / "clean.json", data)
    with _registered("clean_own", str(path), str(tmp_path)) as name:
        assert len(DatasetCatalog.get(name)) == 2
        assert MetadataCatalog.get(name).json_file == str(path)
    assert not cache.exists()


def test_nothing_usable_is_one_line_error(tmp_path, cache):
    data = {"images": [_img(1, w=-1)], "categories": [{"id": 1, "name": "a"}],
            "annotations": [_ann(1)]}
    path = _write(tmp_path / "bad.json", data)
    with _registered("nothing_own", str(path), str(tmp_path)) as name:
        with pytest.raises(CocoJsonError, match=r"no usable image in the COCO json .*"
                                                r"\(1 malformed image entry\)") as e:
            DatasetCatalog.get(name)
    assert "\n" not in str(e.value)
    assert not cache.exists()


def test_cleaned_copy_follows_the_source(tmp_path, cache):
    """A changed json gets a new cleaned copy (the name hashes path, mtime and size)."""
    data, _ = broken_json()
    path = _write(tmp_path / "t.json", data)
    first = cleaned_json_path(path)
    load_clean_coco_json(str(path), str(tmp_path))
    assert first.is_file() and len(list(cache.iterdir())) == 2  # and the evaluator's
    data["images"].append(_img(7))
    _write(path, data)
    second = cleaned_json_path(path)
    assert second != first
    load_clean_coco_json(str(path), str(tmp_path))
    assert len(json.loads(second.read_text())["images"]) == 5


def test_masks_on_some_annotations_only(tmp_path, cache):
    """Nothing to clean for training (the annotation without a mask trains its box), but
    COCO's mask evaluation needs a mask for every annotation: only the evaluator's copy is
    written, with the box as the missing mask."""
    data = {"images": [_img(1)], "categories": [{"id": 1, "name": "a"}],
            "annotations": [_ann(1), _ann(2, bbox=(1.0, 1.0, 4.0, 5.0), segmentation=[])]}
    path = _write(tmp_path / "mixed.json", data)
    _, problems = clean_coco_json(data)
    assert [(p.where, p.reason) for p in problems] == [("annotation 2", "no segmentation")]
    with _registered("mixed_own", str(path), str(tmp_path)) as name:
        dicts = DatasetCatalog.get(name)
        assert len(dicts[0]["annotations"]) == 2
        evaluated = MetadataCatalog.get(name).json_file
    assert evaluated == str(cleaned_json_path(path, kind="eval"))
    assert [p.name for p in cache.iterdir()] == [cleaned_json_path(path, kind="eval").name]
    anns = json.loads(cleaned_json_path(path, kind="eval").read_text())["annotations"]
    assert anns[0] == data["annotations"][0]
    assert anns[1]["segmentation"] == [[1.0, 1.0, 5.0, 1.0, 5.0, 6.0, 1.0, 6.0]]
