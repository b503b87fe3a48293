"""A user's own image data: COCO-format detection data (SafeDatasetMapper, tools/train_net.py)
and ImageFolder classification data (SafeImageFolder, tools/eval_imagenet.py), on files made
here with PIL in the modes people have (grayscale, CMYK, palette, 16-bit, alpha, EXIF-rotated,
progressive) and broken in the ways files break (truncated, zero-byte, not an image, a
directory, missing, a size differing from the json). Every good file loads; every bad one is
skipped with one warning and counted once, per reason."""
import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from revvit_d2.data.imagefolder import (SafeImageFolder, SkippedSample, build_eval_loader,
                                        describe_skips, skip_counts)

from _media import BAD_IMAGES as BAD
from _media import GOOD_IMAGES as GOOD
from _media import (BOX, H, IMAGEFOLDER_BAD, NO_ANNOTATION, W, make_imagefolder,  # noqa: F401
                    make_images, rgb_array, write_coco, write_coco_config)

ROOT = Path(__file__).resolve().parents[1]

# pycocotools' decode under numpy 2 warns on every call; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


# --------------------------------------------------------------------------------------------
# COCO-format detection data: SafeDatasetMapper
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    pytest.importorskip("detectron2")
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    d = tmp_path_factory.mktemp("own_coco")
    make_images(d)
    names = list(GOOD) + list(BAD) + [NO_ANNOTATION]
    json_file = write_coco(d, names)
    name = "revvit_test_own_images"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_file), str(d))
    yield {"root": d, "name": name, "dicts": DatasetCatalog.get(name)}
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _mapper(is_train=True, image_format="RGB", **kw):
    from revvit_d2.d2.data import SafeDatasetMapper

    return SafeDatasetMapper(is_train=is_train, augmentations=[], image_format=image_format,
                             use_instance_mask=True, instance_mask_format="bitmask", **kw)


def _by_name(dicts):
    return {Path(d["file_name"]).name: d for d in dicts}


@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
def test_every_mode_loads_as_detectron2_reads_it(coco, image_format):
    from detectron2.data import detection_utils as utils

    dicts = _by_name(coco["dicts"])
    mapper = _mapper(image_format=image_format)
    red = 0 if image_format == "RGB" else 2
    for name in GOOD:
        out = mapper(dicts[name])
        assert out is not None, name
        img = out["image"]
        expected = (3, W, H) if name == "exif6.jpg" else (3, H, W)
        assert img.shape == expected and img.dtype == torch.uint8, name
        assert len(out["instances"]) == 1, name
        if name not in ("gray16.png",):  # detectron2 saturates 16-bit images; we do not
            ref = utils.read_image(dicts[name]["file_name"], format=image_format)
            assert torch.equal(img, torch.as_tensor(ref.transpose(2, 0, 1).copy())), name
        if name not in ("gray.jpg", "gray16.png", "exif6.jpg"):
            x, y, w, h = BOX  # the square is red (CMYK and palette included)
            assert img[red, y + h // 2, x + w // 2] > 150 > img[2 - red, y + h // 2, x + w // 2]
    gray16 = mapper(dicts["gray16.png"])["image"].int()
    gray = torch.as_tensor(np.array(Image.fromarray(rgb_array()).convert("L"))).int()
    assert (gray16[0] - gray).abs().max() <= 1  # not saturated to white
    assert mapper.num_skipped == 0


def test_bad_files_skipped_once_per_file_with_reason(coco, caplog):
    from revvit_d2.d2 import data as d2_data

    dicts = _by_name(coco["dicts"])
    mapper = _mapper()
    with caplog.at_level(logging.WARNING, logger=d2_data.__name__):
        for _ in range(3):  # the sampler comes back to each file
            for name in BAD:
                assert mapper(dicts[name]) is None, name
    assert mapper.num_skipped == len(BAD)
    assert {Path(f).name: r for f, r in mapper.skipped_reasons.items()} == BAD
    for name in BAD:  # one warning per file, naming it and the reason
        lines = [r.getMessage() for r in caplog.records if name in r.getMessage()]
        assert len(lines) == 1 and BAD[name] in lines[0], (name, lines)
    text = caplog.text
    assert "declared 128x96 (width x height), actual 64x48" in text
    assert "declared 128x96 (width x height), actual 96x128; width and height swapped" in text
    summary = d2_data.skip_summary(is_train=True, what="training image(s)")
    assert summary.startswith("7 training image(s) were skipped: 2 size differs from the "
                              "annotation, 2 unreadable, 1 empty file, 1 missing, 1 not a file")
    # The test mapper applies the same rules.
    test_mapper = _mapper(is_train=False)
    assert test_mapper(dicts["mismatch.png"]) is None and test_mapper.num_skipped == 1
    assert "instances" not in test_mapper(dicts["exif6.jpg"])


def test_no_annotation_filtered_at_build_time(coco):
    from detectron2.data import get_detection_dataset_dicts

    assert NO_ANNOTATION in _by_name(coco["dicts"])
    kept = _by_name(get_detection_dataset_dicts(coco["name"], filter_empty=True))
    assert NO_ANNOTATION not in kept and len(kept) == len(GOOD) + len(BAD)
    out = _mapper(is_train=False)(_by_name(coco["dicts"])[NO_ANNOTATION])
    assert out["image"].shape == (3, H, W)  # evaluation still sees it


def test_distinct_counts_across_workers(coco):
    from detectron2.data import build_detection_train_loader

    dicts = list(coco["dicts"])
    mapper = _mapper()
    loader = build_detection_train_loader(dicts, mapper=mapper, total_batch_size=4,
                                          num_workers=2, aspect_ratio_grouping=False)
    it = iter(loader)
    for _ in range(16):  # 64 samples: each worker meets every file at least once
        assert len(next(it)) == 4
    del it, loader
    assert mapper.num_skipped == len(BAD)
    assert Counter(mapper.skipped_reasons.values()) == Counter(BAD.values())
    # Each file was recorded at most once per worker and is counted once.
    lines = Path(mapper._skips.path).read_text().splitlines()
    assert len(lines) <= 2 * len(BAD)


def test_nothing_usable_is_one_clear_error(coco):
    from revvit_d2.d2.data import NoUsableImagesError
    from revvit_d2.utils.errors import UserError, one_line

    dicts = _by_name(coco["dicts"])
    mapper = _mapper(max_rejected_in_a_row=10)
    bad = [dicts[n] for n in BAD]
    with pytest.raises(NoUsableImagesError) as e:
        for i in range(100):
            assert mapper(bad[i % len(bad)]) is None
    assert isinstance(e.value, UserError)
    msg = one_line(e.value)
    assert msg.startswith("no usable image: the 10 images tried in a row were all skipped (")
    assert "2 unreadable" in msg and "\n" not in str(e.value)
    # After one image was mapped, a run of bad ones is not taken for an unusable dataset.
    mapper = _mapper(max_rejected_in_a_row=3)
    assert mapper(dicts["rgb.png"]) is not None
    for i in range(20):
        assert mapper(bad[i % len(bad)]) is None
    # Re-raised by torch from a data-loader worker, the message is the original line.
    wrapped = ("Caught NoUsableImagesError in DataLoader worker process 0.\nOriginal Traceback "
               "(most recent call last):\n  File \"x.py\", line 1, in <module>\n"
               "revvit_d2.d2.data.NoUsableImagesError: no usable image: the 50 images ...")
    assert str(NoUsableImagesError(wrapped)) == "no usable image: the 50 images ..."


# --------------------------------------------------------------------------------------------
# tools/train_net.py on such a dataset
# --------------------------------------------------------------------------------------------
def _run(tool, *args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               REVVIT_DATASETS=str(cwd / "datasets"))
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *map(str, args)],
                          cwd=str(cwd), env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_net_on_own_data_ends_with_exact_counts(tmp_path):
    pytest.importorskip("detectron2")
    d = tmp_path / "data"
    make_images(d)
    write_coco(d, list(GOOD) + list(BAD) + [NO_ANNOTATION])
    config = write_coco_config(d, "annotations.json")
    proc = _run("train_net.py", "--config-file", config, f"train.output_dir={tmp_path / 'out'}",
                "train.max_iter=5", "train.eval_period=5", "train.log_period=5",
                "dataloader.train.num_workers=2", cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    # detectron2 drops the image without annotation before training.
    assert "Removed 1 images with no usable annotations. 15 images left." in log
    reasons = ("2 size differs from the annotation, 2 unreadable, 1 empty file, 1 missing, "
               "1 not a file")
    assert f"7 training image(s) were skipped: {reasons}" in log, log[-5000:]
    assert f"7 test image(s) were skipped: {reasons}" in log
    for name in BAD:  # one warning per file and loader, whatever the number of workers
        warned = [line for line in log.splitlines()
                  if "SafeDatasetMapper: skipping" in line and name in line]
        assert len(warned) == 2, (name, warned)  # the training and the test loader
    assert "Traceback" not in log and "SizeMismatchError" not in log


@pytest.mark.slow
def test_train_net_nothing_usable_is_one_error_line(tmp_path):
    pytest.importorskip("detectron2")
    d = tmp_path / "data"
    make_images(d)
    write_coco(d, ["truncated.jpg", "text.jpg", "empty.jpg", "mismatch.png"])
    (d / "annotations.json").rename(d / "bad.json")
    config = write_coco_config(d, "bad.json")
    proc = _run("train_net.py", "--config-file", config, f"train.output_dir={tmp_path / 'out'}",
                "train.max_iter=5", cwd=tmp_path)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-5000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-5000:]
    assert lines[0].startswith("error: no usable image: the 50 images tried in a row were all "
                               "skipped (")
    assert "2 unreadable, 1 empty file, 1 size differs from the annotation" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-5000:]
    assert not list((tmp_path / "out").glob("model_*.pth"))


# --------------------------------------------------------------------------------------------
# ImageFolder classification data
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = make_imagefolder(tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("imagefolder"))
    (root / "class_0" / "folder.jpg").mkdir()  # a directory is not listed as a sample
    return root


def test_imagefolder_modes_and_distinct_skips(folder):
    ds = SafeImageFolder(folder)
    assert len(ds) == len(GOOD) + len(IMAGEFOLDER_BAD)
    out = {Path(ds.samples[i][0]).name: ds[i] for i in range(len(ds))}
    for name in GOOD:
        img, _ = out[name]
        assert img.mode == "RGB" and img.size == (W, H), name  # no EXIF rotation (official)
    gray16 = np.asarray(out["gray16.png"][0])[..., 0].astype(int)
    assert np.abs(gray16 - np.asarray(out["gray.jpg"][0])[..., 0].astype(int)).max() <= 3
    for name, reason in IMAGEFOLDER_BAD.items():
        assert isinstance(out[name], SkippedSample) and out[name].reason == reason, name
    for i in range(len(ds)):  # read again: still counted once
        ds[i]
    assert ds.skipped == 3
    assert {Path(p).name: r for p, r in ds.skipped_files.items()} == IMAGEFOLDER_BAD
    assert describe_skips(ds.skipped_files) == "3 skipped: 2 unreadable, 1 empty file"
    assert describe_skips({}) == "0 skipped"


def test_imagefolder_loader_counts_distinct_files(folder):
    from revvit_d2.data.imagefolder import build_eval_transform

    _, loader = build_eval_loader(folder, build_eval_transform(32), batch_size=4, num_workers=1)
    skipped, images = [], 0
    for _ in range(2):
        for batch in loader:
            skipped += batch["skipped"]
            images += 0 if batch["images"] is None else batch["images"].shape[0]
    assert len(skipped) == 6 and images == 2 * len(GOOD)
    assert {Path(p).name: r for p, r in skip_counts(skipped).items()} == IMAGEFOLDER_BAD


@pytest.mark.slow
def test_eval_imagenet_on_own_folder(folder, tmp_path):
    proc = _run("eval_imagenet.py", "--num-gpus", "0", "--checkpoint", "none",
                f"eval.data={folder}", "eval.batch_size=4", "eval.num_workers=1", cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "Evaluated 8 images (3 skipped as unreadable: 2 unreadable, 1 empty file)" \
        in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("* Acc@1 ")
    assert " images 8 skipped 3 " in proc.stdout
    for name in IMAGEFOLDER_BAD:
        assert sum(name in line and "skipping unreadable image" in line
                   for line in proc.stdout.splitlines()) == 1, name
