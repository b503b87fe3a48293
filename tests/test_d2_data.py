"""The Detectron2 data parts (revvit_d2.d2.data): registration of the built-in shapes dataset
and the bad-input tolerant dataset mapper with its counted skips."""
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")
pytest.importorskip("pycocotools")

import pycocotools.mask as mask_util  # noqa: E402
from PIL import Image  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog  # noqa: E402
from detectron2.data import build_detection_train_loader  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.structures import BoxMode  # noqa: E402

from revvit_d2.d2 import data as d2_data  # noqa: E402
from revvit_d2.d2.data import SafeDatasetMapper, register_synthetic_coco  # noqa: E402
from revvit_d2.data.synthetic import coco_shapes  # noqa: E402
from revvit_d2.data.synthetic.coco_shapes import CLASSES, make_synthetic_coco  # noqa: E402

SMALL = dict(num_train=36, num_val=24, seed=3)

# pycocotools' decode under numpy 2 warns on every call; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_synthetic")
    return make_synthetic_coco(root, **SMALL)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------
def test_register_twice(small, tmp_path, monkeypatch):
    names = ("revvit_test_shapes_train", "revvit_test_shapes_val")
    try:
        assert register_synthetic_coco(small["root"], names=names, **SMALL) == names
        assert register_synthetic_coco(small["root"], names=names, **SMALL) == names
        meta = MetadataCatalog.get(names[1])
        assert meta.evaluator_type == "coco"
        assert meta.thing_classes == list(CLASSES)
        assert meta.json_file == str(small["val_json"])
        dicts = DatasetCatalog.get(names[0])
        assert len(dicts) == SMALL["num_train"]
        anno = dicts[0]["annotations"][0]
        assert 0 <= anno["category_id"] < len(CLASSES)
        assert isinstance(anno["segmentation"], dict)  # RLE
        # The default root is $REVVIT_DATASETS/coco_synthetic.
        monkeypatch.setenv("REVVIT_DATASETS", str(tmp_path))
        assert coco_shapes.default_coco_synthetic_root() == tmp_path / "coco_synthetic"
    finally:
        for n in names:
            if n in DatasetCatalog.list():
                DatasetCatalog.remove(n)
                MetadataCatalog.remove(n)


# --------------------------------------------------------------------------------------------
# SafeDatasetMapper
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[8:40, 8:40] = (200, 30, 30)
    Image.fromarray(rgb).save(d / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(d / "gray.png")
    rgba = np.concatenate([rgb, np.full((48, 64, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(d / "gray16.png")
    (d / "garbage.jpg").write_bytes(b"this is not an image")
    square = [[8.0, 8.0, 40.0, 8.0, 40.0, 40.0, 8.0, 40.0]]

    def ann(bbox, cat=0, segm=square):
        a = {"bbox": bbox, "bbox_mode": BoxMode.XYWH_ABS, "category_id": cat, "iscrowd": 0}
        if segm is not None:
            a["segmentation"] = segm
        return a

    rle = mask_util.encode(np.asfortranarray((rgb[..., 0] > 0).astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")

    def rec(name, annos, image_id):
        return {"file_name": str(d / name), "height": 48, "width": 64, "image_id": image_id,
                "annotations": annos}

    return {
        "good": rec("rgb.png", [ann([8, 8, 32, 32])], 1),
        "empty": rec("rgb.png", [], 2),
        "degenerate": rec("rgb.png", [ann([8, 8, 0, 32], 1, [[8.0, 8.0, 8.0, 40.0, 8.0, 20.0]]),
                                      ann([8, 8, 32, 0], 2, None), ann([8, 8, 32, 32])], 3),
        "gray": rec("gray.png", [ann([8, 8, 32, 32])], 4),
        "rgba": rec("rgba.png", [ann([8, 8, 32, 32])], 5),
        "gray16": rec("gray16.png", [ann([8, 8, 32, 32])], 6),
        "missing": rec("does_not_exist.jpg", [ann([8, 8, 32, 32])], 7),
        "garbage": rec("garbage.jpg", [ann([8, 8, 32, 32])], 8),
        "mixed_segm": rec("rgb.png", [ann([8, 8, 32, 32]), ann([1, 1, 4, 4], 1, [])], 9),
        "rle": rec("rgb.png", [ann([8, 8, 32, 32], 0, rle)], 10),
        "no_valid_segm": rec("rgb.png", [ann([8, 8, 32, 32], 0, []),
                                         ann([8, 8, 32, 32], 1, [[1.0, 2.0, 3.0, 4.0]])], 12),
        "no_annotations_key": {"file_name": str(d / "rgb.png"), "height": 48, "width": 64,
                               "image_id": 11},
    }


def _mapper(is_train=True, mask_format="polygon"):
    return SafeDatasetMapper(is_train=is_train, augmentations=[T.ResizeShortestEdge(64, 128)],
                             image_format="BGR", use_instance_mask=True,
                             instance_mask_format=mask_format)


def test_mapper_matches_detectron2_on_good_input(bad_inputs):
    ours = _mapper()(bad_inputs["good"])
    ref = DatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge(64, 128)],
                        image_format="BGR", use_instance_mask=True)(bad_inputs["good"])
    assert torch.equal(ours["image"], ref["image"])
    assert torch.equal(ours["instances"].gt_boxes.tensor, ref["instances"].gt_boxes.tensor)
    assert torch.equal(ours["instances"].gt_classes, ref["instances"].gt_classes)
    test = _mapper(is_train=False)(bad_inputs["good"])
    assert "instances" not in test and "annotations" not in test


def test_mapper_bad_cases(bad_inputs, caplog):
    mapper = _mapper()
    for key in ("empty", "no_annotations_key"):
        out = mapper(bad_inputs[key])
        assert out["image"].shape == (3, 64, 85) and len(out["instances"]) == 0
    out = mapper(bad_inputs["degenerate"])  # zero-width/-height boxes are filtered
    assert len(out["instances"]) == 1 and out["instances"].gt_classes.tolist() == [0]
    assert (out["instances"].gt_boxes.area() > 0).all()
    for key in ("gray", "rgba", "gray16"):
        out = mapper(bad_inputs[key])
        assert out["image"].shape == (3, 64, 85) and out["image"].dtype == torch.uint8, key
        assert len(out["instances"]) == 1
    gray16 = mapper(bad_inputs["gray16"])["image"]
    gray = mapper(bad_inputs["gray"])["image"]
    assert (gray16.int() - gray.int()).abs().max() <= 1  # not saturated to 255
    out = mapper(bad_inputs["mixed_segm"])  # stock detectron2: KeyError 'segmentation'
    assert len(out["instances"]) == 1
    out = mapper(bad_inputs["no_valid_segm"])  # stock: instances without gt_masks
    assert len(out["instances"]) == 0 and out["instances"].has("gt_boxes")
    out = mapper(bad_inputs["rle"])  # stock detectron2 + polygon format: ValueError
    assert out["instances"].gt_masks.tensor.shape == (1, 64, 85)

    assert mapper.num_skipped == 0
    with caplog.at_level(logging.WARNING, logger=d2_data.__name__):
        for _ in range(2):  # met twice: one warning and one count per file
            assert mapper(bad_inputs["missing"]) is None
            assert mapper(bad_inputs["garbage"]) is None
    assert mapper.num_skipped == 2
    assert caplog.text.count("does_not_exist.jpg: missing") == 1
    assert caplog.text.count("garbage.jpg: unreadable") == 1
    assert [Path(f).name for f in mapper.skipped_files] == ["does_not_exist.jpg", "garbage.jpg"]
    assert d2_data.num_skipped() >= 2
    assert "does_not_exist.jpg" in caplog.text and "garbage.jpg" in caplog.text
    test_mapper = _mapper(is_train=False)
    assert test_mapper(bad_inputs["missing"]) is None and test_mapper.num_skipped == 1


@pytest.mark.parametrize("num_workers", [0, 1])
def test_train_loader_skips_missing_file(bad_inputs, num_workers):
    dicts = [bad_inputs[k] for k in ("good", "missing", "gray", "rgba", "empty", "degenerate")]
    mapper = _mapper()
    loader = build_detection_train_loader(dicts, mapper=mapper, total_batch_size=2,
                                          num_workers=num_workers, aspect_ratio_grouping=False)
    seen = set()
    it = iter(loader)
    for _ in range(6):  # the infinite TrainingSampler visits every index in the first 6 samples
        batch = next(it)
        assert len(batch) == 2
        for x in batch:
            assert x["image"].shape[0] == 3 and "instances" in x
            seen.add(x["image_id"])
    del it, loader
    assert 7 not in seen  # the missing file never comes out; another sample replaces it
    assert mapper.num_skipped == 1  # counted once, across the worker process too
    assert set(mapper.skipped_files) == {bad_inputs["missing"]["file_name"]}
