"""The built-in synthetic COCO shapes dataset (revvit_d2.data.synthetic.coco_shapes): no
detectron2 needed. Its registration and the bad-input tolerant mapper: test_d2_data.py."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

from PIL import Image  # noqa: E402

from revvit_d2.data.synthetic.coco_shapes import CLASSES, make_synthetic_coco  # noqa: E402

SMALL = dict(num_train=36, num_val=24, seed=3)

# pycocotools' decode under numpy 2 warns on every call; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def _digest(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            out[str(p.relative_to(root))] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_synthetic")
    return make_synthetic_coco(root, **SMALL)


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------
def test_deterministic_and_idempotent(small, tmp_path):
    root = small["root"]
    before = _digest(root)
    mtime = small["train_json"].stat().st_mtime_ns
    again = make_synthetic_coco(root, **SMALL)  # same parameters: nothing is rewritten
    assert again == small
    assert small["train_json"].stat().st_mtime_ns == mtime
    assert _digest(root) == before
    # An independent run elsewhere gives the same bytes (images and json).
    other = make_synthetic_coco(tmp_path / "other", **SMALL)
    assert _digest(other["root"]) == before
    # Image i of a split depends on (seed, split, i) only: more train images, same val.
    more = make_synthetic_coco(tmp_path / "more", **dict(SMALL, num_train=40))
    assert more["val_json"].read_bytes() == small["val_json"].read_bytes()


def test_regenerates_on_new_parameters_or_interrupted_run(tmp_path):
    root = tmp_path / "ds"
    make_synthetic_coco(root, num_train=4, num_val=3)
    make_synthetic_coco(root, num_train=5, num_val=3)
    assert len(list((root / "train").iterdir())) == 5
    # A run killed mid-way leaves its .in_progress marker and no .complete marker.
    (root / ".complete").unlink()
    (root / ".in_progress").write_text("{}")
    (root / "train" / "train_000000.jpg").unlink()
    make_synthetic_coco(root, num_train=5, num_val=3)
    assert (root / "train" / "train_000000.jpg").is_file()
    assert not (root / ".in_progress").exists()
    # A folder that was not made here is never overwritten.
    foreign = tmp_path / "foreign"
    (foreign / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        make_synthetic_coco(foreign, num_train=2, num_val=2)


def test_coco_json_masks_agree_with_boxes(small):
    from pycocotools.coco import COCO

    for split in ("train", "val"):
        coco = COCO(str(small[f"{split}_json"]))
        assert [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))] == list(CLASSES)
        assert len(coco.getImgIds()) == SMALL[f"num_{split}"]
        for img in coco.loadImgs(coco.getImgIds()):
            with Image.open(small[f"{split}_images"] / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) and im.mode == "RGB"
        for ann in coco.loadAnns(coco.getAnnIds()):
            assert ann["iscrowd"] == 0
            mask = coco.annToMask(ann)
            img = coco.imgs[ann["image_id"]]
            assert mask.shape == (img["height"], img["width"])
            ys, xs = np.nonzero(mask)
            assert len(xs) == ann["area"] > 0
            x, y, w, h = ann["bbox"]
            # tight box of the decoded mask, COCO pixel convention (x1 - x0 + 1)
            tight = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert np.allclose([x, y, w, h], tight, atol=1), (ann["id"], ann["bbox"], tight)


def test_classes_in_both_splits_and_overlap(small):
    stats = json.loads(small["stats"].read_text())
    for split in ("train", "val"):
        coco = json.loads(small[f"{split}_json"].read_text())
        cats = {a["category_id"] for a in coco["annotations"]}
        assert cats == set(range(1, len(CLASSES) + 1)), (split, cats)
        # Occlusion: some image has two instances whose boxes intersect, and the stats (which
        # compare visible with full areas) report occluded instances.
        by_img = {}
        for a in coco["annotations"]:
            by_img.setdefault(a["image_id"], []).append(a["bbox"])

        def intersect(a, b):
            return (min(a[0] + a[2], b[0] + b[2]) > max(a[0], b[0])
                    and min(a[1] + a[3], b[1] + b[3]) > max(a[1], b[1]))

        overlapping = sum(any(intersect(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
                          for boxes in by_img.values())
        assert overlapping > 0
        assert stats[split]["images_with_occlusion"] > 0
        assert stats[split]["instances"] == len(coco["annotations"])


def test_backgrounds_plain_and_textured(tmp_path):
    # "plain": one colour per image (plus pixel noise); "textured": smooth two-colour noise and
    # lines. Measured on the pixels no instance covers.
    from pycocotools.coco import COCO

    spread = {}
    for style in ("plain", "textured"):
        paths = make_synthetic_coco(tmp_path / style, num_train=8, num_val=1, seed=5,
                                    background=style)
        coco = COCO(str(paths["train_json"]))
        values = []
        for img in coco.loadImgs(coco.getImgIds()):
            pixels = np.asarray(Image.open(paths["train_images"] / img["file_name"]), np.float32)
            covered = np.zeros(pixels.shape[:2], bool)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
                covered |= coco.annToMask(ann).astype(bool)
            # dilate the objects by 2 px so that anti-aliased edges do not count as background
            covered = torch.nn.functional.max_pool2d(
                torch.from_numpy(covered)[None, None].float(), 5, 1, 2)[0, 0].bool().numpy()
            values.append(float(pixels[~covered].std(axis=0).mean()))
        spread[style] = float(np.median(values))
    # plain: the pixel noise (sigma 2-6) and JPEG only
    assert spread["plain"] < 6 and spread["textured"] > 1.5 * spread["plain"], spread
    with pytest.raises(ValueError, match="background"):
        make_synthetic_coco(tmp_path / "bad", num_train=1, num_val=1, background="stripes")


def test_default_size_generation_is_reasonable():
    # The defaults the demo uses: checked without generating 1200 images here.
    import inspect

    sig = inspect.signature(make_synthetic_coco)
    assert sig.parameters["num_train"].default >= 500
    assert sig.parameters["num_val"].default >= 100


def _generate_in_child(root):
    return {k: str(v) for k, v in make_synthetic_coco(root, num_train=6, num_val=4).items()}


def test_concurrent_generation_is_safe(tmp_path):
    import multiprocessing as mp

    root = tmp_path / "shared"
    with mp.get_context("fork").Pool(3) as pool:  # like DDP ranks that all register at start
        results = pool.map(_generate_in_child, [root] * 3)
    assert all(r == results[0] for r in results)
    reference = make_synthetic_coco(tmp_path / "single", num_train=6, num_val=4)
    assert _digest(root) == _digest(reference["root"])
    assert not (root / ".in_progress").exists()
