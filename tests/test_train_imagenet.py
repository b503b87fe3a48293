"""tools/train_imagenet.py and its library parts: the timm training transform and Mixup, the
built-in demo, exact resume, fine-tuning to another class count, and bad input as one line.

Every run says ``train.device=cpu`` (gloo, CPU kernels: exact comparisons hold on any machine).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _runs import assert_losses_repeat, assert_one_error_line, kill_when, start_tool
from revvit_d2 import create_model
from revvit_d2.data.imagefolder_train import (AUGMENT_DEFAULTS, build_mixup,
                                              build_train_transform, check_rand_augment)
from revvit_d2.data.synthetic.imagenet import make_synthetic_imagefolder

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "train_imagenet.py"
ENV = dict(os.environ, REVVIT_DATASETS=str(ROOT / "datasets"), PYTHONUNBUFFERED="1",
           OMP_NUM_THREADS="1")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SETUP_FILES = {"config.yaml", "log.txt"}  # detectron2's default_setup


# ------------------------------------------------------------------------------------------
# Library parts
# ------------------------------------------------------------------------------------------
def test_train_transform_gives_normalised_tensors_of_the_model_size():
    colour = (200, 30, 90)
    img = Image.new("RGB", (97, 61), colour)
    plain = build_train_transform(48, MEAN, STD, auto_augment=None, color_jitter=0.0,
                                  re_prob=0.0, hflip=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    x = plain(img)
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    expected = (torch.tensor(colour) / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=0.02, rtol=0)
    assert float(x.std(dim=(1, 2)).max()) < 0.05  # one colour stays one colour

    recipe = build_train_transform(48, MEAN, STD)  # RandAugment, random erasing...
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    outs = torch.stack([recipe(photo) for _ in range(8)])
    assert outs.shape == (8, 3, 48, 48) and torch.isfinite(outs).all()
    assert abs(float(outs.mean())) < 0.6 and 0.4 < float(outs.std()) < 2.0  # normalised
    assert not torch.equal(outs[0], outs[1])  # random augmentations


def test_mixup_targets_are_soft_and_sum_to_one():
    torch.manual_seed(0)
    np.random.seed(0)
    mixup = build_mixup(10, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    for _ in range(4):  # Mixup and CutMix batches
        mixed, targets = mixup(images.clone(), labels)
        assert mixed.shape == images.shape and targets.shape == (6, 10)
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
        assert float(targets.min()) >= 0.1 / 10 - 1e-6  # smoothing reaches every class
    assert build_mixup(10, mixup_alpha=0.0, cutmix_alpha=0.0) is None


@pytest.mark.parametrize("kwargs,needle", [
    (dict(randaugment="rand-m9"), "unknown augmentation key 'randaugment'"),
    (dict(auto_augment="rand-m9-bogus"), "section 'bogus'"),
    (dict(auto_augment="rand-x7"), "section 'x7'"),
    (dict(auto_augment="autoaug"), "only RandAugment strings"),
    (dict(re_mode="sparkle"), "training augmentation"),
])
def test_bad_augmentation_settings_are_one_line(kwargs, needle):
    with pytest.raises(ValueError) as e:
        build_train_transform(32, MEAN, STD, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_official_randaugment_strings_are_accepted():
    for spec in ("rand-m7-mstd0.5-inc1", "rand-m6-n5-mstd0.5-inc1", "rand-m9-n6-mstd0.5-inc1",
                 AUGMENT_DEFAULTS["auto_augment"], None):
        check_rand_augment(spec)
    with pytest.raises(ValueError, match="unknown mixup key 'alpha'"):
        build_mixup(10, alpha=0.2)


def test_training_stream_restarts_at_any_iteration_and_reports_unreadable_images(folder):
    from revvit_d2.d2.sampler import build_resumable_train_loader
    from revvit_d2.data.imagefolder import SafeImageFolder
    from revvit_d2.data.imagefolder_train import SkipUnreadable, collate_train_batch

    images = SafeImageFolder(folder / "train", transform=build_train_transform(32, MEAN, STD))

    def batches(start, n):
        loader = build_resumable_train_loader(
            range(len(images)), mapper=SkipUnreadable(images), total_batch_size=4, seed=3,
            start_iter=start, aspect_ratio_grouping=False, num_workers=1,
            collate_fn=collate_train_batch)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    full, late = batches(0, 12), batches(7, 5)
    for a, b in zip(full[7:], late):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["targets"], b["targets"])
    assert all(b["images"].shape == (4, 3, 32, 32) for b in full)  # full batches
    skipped = {s.path for b in full for s in b["skipped"]}
    assert skipped == {str(folder / "train" / "03_cross" / "broken.JPEG")}  # 12 x 4 > 41


# ------------------------------------------------------------------------------------------
# Tool runs
# ------------------------------------------------------------------------------------------
def _run(args, cwd, timeout=600):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=str(cwd), env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _summary(out: str):
    lines = [l for l in out.splitlines() if l.startswith("* Acc@1 ")]
    assert len(lines) == 1 and out.rstrip().splitlines()[-1] == lines[0], out[-3000:]
    fields = lines[0].split()
    return float(fields[2]), float(fields[4])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """10 shape classes, 4 training images each plus one unreadable file, 2 val images each."""
    root = make_synthetic_imagefolder(tmp_path_factory.mktemp("img") / "shapes",
                                      train_per_class=4, val_per_class=2, image_size=(40, 60))
    (root / "train" / "03_cross" / "broken.JPEG").write_bytes(b"not a jpeg")
    return root


def _tiny(folder, out, *extra):
    """A few iterations of the tiny Rev-ViT with the whole recipe (RandAugment, erasing,
    Mixup / CutMix, drop path, clipping) on `folder`."""
    return [f"dataloader.train.data={folder / 'train'}", f"dataloader.test.data={folder / 'val'}",
            "dataloader.train.total_batch_size=4", "dataloader.train.num_workers=1",
            "dataloader.test.num_workers=0", "model.drop_path_rate=0.2",
            "dataloader.train.mixup.prob=1.0", "train.log_period=1", "train.eval_period=0",
            f"train.output_dir={out}", "train.device=cpu", *extra]


def _last_iteration(out: Path) -> int:
    tag = out / "last_checkpoint"
    name = tag.read_text().strip() if tag.exists() else ""
    return int(name[len("model_"):-len(".pth")]) if name.startswith("model_0") else -1


@pytest.mark.slow
def test_resume_after_sigkill_repeats_the_losses(folder, tmp_path):
    common = ["train.max_iter=10", "train.checkpointer.period=3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    done = _run(_tiny(folder, full, *common), ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Training skipped 1 of 41 images (1 unreadable)" in done.stdout
    _summary(done.stdout)

    args = _tiny(folder, killed, *common)
    at = kill_when(start_tool(TOOL, args, ROOT, ENV), lambda: _last_iteration(killed), 5)
    assert at in (5, 8)
    resumed = _run(["--resume"] + args, ROOT)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at iteration {at + 1}" in resumed.stdout
    assert_losses_repeat(full, killed, at, 10)


@pytest.mark.slow
def test_finetune_to_another_class_count_needs_the_option(folder, tmp_path):
    source = tmp_path / "rev_vit_test_1000.pth"
    model = create_model("rev_vit_test", num_classes=1000, patch_size=8)  # the demo's size
    torch.save({"model": model.state_dict()}, source)
    args = ["model.num_classes=10", f"train.init_checkpoint={source}", "train.max_iter=2"]

    refused = _run(_tiny(folder, tmp_path / "refused", *args), tmp_path)
    assert_one_error_line(refused, "head.weight")
    assert set(p.name for p in (tmp_path / "refused").iterdir()) <= SETUP_FILES

    tuned = _run(_tiny(folder, tmp_path / "tuned", *args, "train.finetune=True"), tmp_path)
    assert tuned.returncode == 0, tuned.stdout[-3000:] + tuned.stderr[-3000:]
    assert f"fine-tuning from {source}: " in tuned.stdout
    assert "new head for 10 classes (head.bias, head.weight)" in tuned.stdout
    _summary(tuned.stdout)


@pytest.mark.slow
def test_finetune_from_plain_vit_weights(folder, tmp_path):
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8,
                            embed_dim=64, depth=4, num_heads=2, num_classes=1000)
    source = tmp_path / "timm_vit.pth"
    torch.save(vit.state_dict(), source)
    out = _run(_tiny(folder, tmp_path / "vit", "model.num_classes=10", "model.rewire=re2tal",
                     f"train.init_checkpoint={source}", "train.finetune=True",
                     "train.max_iter=2"), tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "(timm format)" in out.stdout and "new head for 10 classes" in out.stdout
    _summary(out.stdout)


def _bad_cases(folder, root):
    (root / "empty" / "a_class").mkdir(parents=True)
    return {
        "empty_folder": ([f"dataloader.train.data={root / 'empty'}"], "no images"),
        "missing_folder": ([f"dataloader.train.data={root / 'nope'}"], "not found"),
        "unknown_augment_key": (["dataloader.train.augment={randaug:rand-m9}"],
                                "unknown augmentation key 'randaug'"),
        "randaugment_string": (["dataloader.train.augment.auto_augment=rand-m9-bogus"],
                               "section 'bogus'"),
        "unknown_mixup_key": (["dataloader.train.mixup={alpha:0.2}"],
                              "unknown mixup key 'alpha'"),
        "more_classes_than_the_head": (["model.num_classes=5"], "10 class folders"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["empty_folder", "missing_folder", "unknown_augment_key",
                                  "randaugment_string", "unknown_mixup_key",
                                  "more_classes_than_the_head"])
def test_bad_input_is_one_error_line_and_nothing_written(case, folder, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    args, needle = _bad_cases(folder, tmp_path)[case]
    proc = _run(_tiny(folder, out, "train.max_iter=2") + args, work, timeout=300)
    assert_one_error_line(proc, needle)
    assert not list(work.iterdir())
    left = set(p.name for p in out.iterdir()) if out.exists() else set()
    assert left <= SETUP_FILES, left


@pytest.mark.slow
def test_builtin_demo_learns(tmp_path):
    """The tool without arguments: the tiny Rev-ViT on the built-in shape folder, CPU."""
    proc = _run([f"train.output_dir={tmp_path / 'demo'}"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    top1, _ = _summary(proc.stdout)
    assert top1 >= 20.0, proc.stdout[-3000:]  # chance: 10 %; measured 31.5 (docs)
