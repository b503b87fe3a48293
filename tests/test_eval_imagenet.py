"""tools/eval_imagenet.py, the synthetic ImageNet-layout folder and the eval preprocessing (bad
input: tests/test_bad_input.py)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import revvit_d2
from revvit_d2 import get_pretrained_cfg
from revvit_d2.data.imagefolder import (
    SafeImageFolder,
    build_eval_loader,
    build_eval_transform,
    eval_transform_from_cfg,
)
from revvit_d2.data.synthetic.imagenet import SHAPES, make_synthetic_imagefolder

from _helpers import oracle_path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "eval_imagenet.py"
ORACLE = "slowfast_revvit_tiny.pt"  # tests/data/oracle: official SlowFast weights and logits
IMAGENET_CONFIGS = sorted(p.name for p in (ROOT / "configs" / "ImageNet").glob("*_eval.py"))
SUMMARY = re.compile(r"^\* Acc@1 (?P<top1>[\d.]+) Acc@5 (?P<top5>[\d.]+) images (?P<images>\d+) "
                     r"skipped (?P<skipped>\d+) images/s [\d.]+ params (?P<params>[\d,]+) "
                     r"GFLOPs [\d.]+$")
TINY = dict(num_classes=10, train_per_class=1, val_per_class=3, image_size=(40, 60), seed=0)


def _files(root: Path):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.JPEG"))


def run_tool(*args, env=None, cwd=None, timeout=120):
    full_env = dict(os.environ)
    full_env.pop("REVVIT_DATASETS", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=str(cwd or ROOT), timeout=timeout)


def summary(proc):
    lines = [l for l in proc.stdout.splitlines() if l.startswith("* Acc@1")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().splitlines()[-1] == lines[0]
    m = SUMMARY.match(lines[0])
    assert m, lines[0]
    return m


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_synthetic_imagefolder(tmp_path_factory.mktemp("tiny") / "syn", **TINY)


# ---------------------------------------------------------------------------------------------
# (a) synthetic folder
# ---------------------------------------------------------------------------------------------
def test_synthetic_folder_deterministic_and_idempotent(tmp_path, monkeypatch):
    a = make_synthetic_imagefolder(tmp_path / "a", **TINY)
    b = make_synthetic_imagefolder(tmp_path / "b", **TINY)
    classes = [f"{i:02d}_{s}" for i, s in enumerate(SHAPES)]
    for split, per_class in (("train", 1), ("val", 3)):
        assert sorted(p.name for p in (a / split).iterdir()) == classes
        for c in classes:
            assert len(list((a / split / c).glob("*.JPEG"))) == per_class
    files = _files(a)
    assert files == _files(b) and len(files) == 40
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)  # deterministic
    sizes = {Image.open(a / f).size for f in files}
    assert all(40 <= w <= 60 and 40 <= h <= 60 for w, h in sizes)
    assert any(w != h for w, h in sizes) and len(sizes) > 10
    assert all(Image.open(a / f).mode == "RGB" for f in files)
    assert json.loads((a / ".complete").read_text())["val_per_class"] == 3

    # ImageFolder sees label i for class folder i.
    ds = SafeImageFolder(a / "val")
    assert ds.classes == classes and len(ds) == 30
    assert [t for _, t in ds.samples] == [i for i in range(10) for _ in range(3)]

    # Second call with the same parameters: nothing is rendered or written.
    import revvit_d2.data.synthetic.imagenet as mod

    stamp = {f: (a / f).stat().st_mtime_ns for f in files}
    monkeypatch.setattr(mod, "_render", lambda *a, **k: pytest.fail("re-rendered"))
    assert make_synthetic_imagefolder(a, **TINY) == a
    assert {f: (a / f).stat().st_mtime_ns for f in files} == stamp
    monkeypatch.undo()

    # Other parameters: regenerated from scratch.
    make_synthetic_imagefolder(a, **dict(TINY, num_classes=3, val_per_class=2))
    assert sorted(p.name for p in (a / "val").iterdir()) == classes[:3]
    assert len(_files(a / "val")) == 6

    # An interrupted run (no .complete, .in_progress left behind) is redone cleanly.
    (a / ".complete").unlink()
    (a / ".in_progress").write_text("{}")
    (a / "val" / "00_circle" / "stray.JPEG").write_bytes(b"partial")
    make_synthetic_imagefolder(a, **TINY)
    assert _files(a) == files and not (a / ".in_progress").exists()
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)

    # A folder it did not make is never overwritten.
    (tmp_path / "real" / "val" / "n01").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="refusing"):
        make_synthetic_imagefolder(tmp_path / "real", **TINY)


def test_synthetic_default_size(tmp_path):
    root = make_synthetic_imagefolder(tmp_path / "d")
    assert len(_files(root / "train")) == len(_files(root / "val")) == 200


# ---------------------------------------------------------------------------------------------
# (b) preprocessing against an independent PIL / numpy computation
# ---------------------------------------------------------------------------------------------
def _manual(img, short, crop, mean, std):
    w, h = img.size
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    r = np.asarray(img.resize((nw, nh), Image.BICUBIC), dtype=np.float64) / 255.0
    top, left = int(round((nh - crop) / 2)), int(round((nw - crop) / 2))
    r = r[top:top + crop, left:left + crop]
    r = (r - np.asarray(mean)) / np.asarray(std)
    return torch.from_numpy(r.transpose(2, 0, 1).copy()).float()


@pytest.mark.parametrize("wh", [(300, 200), (190, 333)])
def test_eval_transform_matches_manual_pil(wh):
    g = torch.Generator().manual_seed(0)
    arr = torch.randint(0, 256, (wh[1], wh[0], 3), generator=g, dtype=torch.uint8).numpy()
    img = Image.fromarray(arr, "RGB")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = _manual(img, 256, 224, mean, std)
    got = build_eval_transform(224, crop_pct=0.875, interpolation="bicubic", mean=mean, std=std)(img)
    assert got.shape == (3, 224, 224)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The same through a model's pretrained_cfg (ImageNet mean/std, 224, 0.875, bicubic).
    cfg_t = eval_transform_from_cfg(get_pretrained_cfg("rev_vit_b"))
    torch.testing.assert_close(cfg_t(img), expected, atol=1e-5, rtol=0)
    # The tiny model: int(64 / 0.875) = 73, crop 64.
    tiny = eval_transform_from_cfg(get_pretrained_cfg("rev_vit_test"))(img)
    torch.testing.assert_close(tiny, _manual(img, 73, 64, mean, std), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# data loading errors and corrupt files (in process)
# ---------------------------------------------------------------------------------------------
def test_imagefolder_missing_and_empty_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        SafeImageFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders in " + re.escape(str(tmp_path))):
        SafeImageFolder(tmp_path / "empty")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        SafeImageFolder(tmp_path / "noimg")


def _corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "00_circle" / "garbage.JPEG").write_bytes(b"this is not a JPEG")
    good = sorted((dst / "01_square").glob("*.JPEG"))[0].read_bytes()
    (dst / "01_square" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    return dst


def test_loader_skips_corrupt_images(tiny_folder, tmp_path):
    root = _corrupt_copy(tiny_folder / "val", tmp_path / "val")
    t = eval_transform_from_cfg(get_pretrained_cfg("rev_vit_test"))
    for workers in (0, 2):
        ds, loader = build_eval_loader(root, t, batch_size=7, num_workers=workers)
        batches = list(loader)
        skipped = [s for b in batches for s in b["skipped"]]
        n = sum(b["images"].shape[0] for b in batches if b["images"] is not None)
        assert n == 30 and sorted(Path(s.path).name for s in skipped) == [
            "garbage.JPEG", "truncated.JPEG"]
    ds, loader = build_eval_loader(root, t, batch_size=4, num_workers=0, max_images=8)
    assert list(loader.dataset.indices) == [0, 4, 8, 12, 16, 20, 24, 28]  # evenly spaced
    assert len({ds.samples[i][1] for i in loader.dataset.indices}) == 8  # many classes


# ---------------------------------------------------------------------------------------------
# (c)-(f) the tool, as a subprocess
# ---------------------------------------------------------------------------------------------
def test_tool_help():
    proc = run_tool("--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--config-file", "--num-gpus", "--checkpoint", "opts"):
        assert flag in proc.stdout


def test_tool_defaults_generate_builtin_data(tmp_path):
    # Defaults (rev_vit_test config) with REVVIT_DATASETS pointing into tmp_path: the built-in
    # synthetic folder is generated, then evaluated (a subset, to keep the test fast).
    proc = run_tool("--max-images", 40, env={"REVVIT_DATASETS": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "imagenet_synthetic" / ".complete").is_file()
    m = summary(proc)
    assert (int(m["images"]), int(m["skipped"]), m["params"]) == (40, 0, "251,722")
    assert "random" in proc.stdout  # no checkpoint: said so


def _reference_accuracy(val_dir: Path, checkpoint: Path):
    """Top-1 / top-5 (%) and image count, computed apart from the tool: weights straight from
    the oracle's state dict, the PIL / numpy preprocessing of _manual (73 = int(64 / 0.875)),
    one image at a time, labels from the class folders' numeric prefixes, unreadable files
    left out."""
    model = revvit_d2.create_model("rev_vit_test").eval()
    official = torch.load(checkpoint, weights_only=True)["state_dict"]
    model.load_state_dict(revvit_d2.convert_slowfast_state_dict(official), strict=True)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    top1 = top5 = n = 0
    for class_dir in sorted(val_dir.iterdir()):
        label = int(class_dir.name.split("_")[0])
        for f in sorted(class_dir.glob("*.JPEG")):
            try:
                img = Image.open(f).convert("RGB")
            except OSError:
                continue
            with torch.no_grad():
                logits = model(_manual(img, 73, 64, mean, std)[None])[0]
            ranked = logits.argsort(descending=True).tolist()
            top1 += ranked[0] == label
            top5 += label in ranked[:5]
            n += 1
    return 100.0 * top1 / n, 100.0 * top5 / n, n


def test_tool_with_oracle_checkpoint_and_corrupt_image(tiny_folder, tmp_path):
    checkpoint = oracle_path(ORACLE)
    val = _corrupt_copy(tiny_folder / "val", tmp_path / "val")
    proc = run_tool("--num-gpus", 0, "--checkpoint", checkpoint, f"eval.data={val}",  # CPU
                    "eval.batch_size=8", "eval.num_workers=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"loaded checkpoint {checkpoint} (slowfast format)" in proc.stdout
    assert "skipping unreadable image" in proc.stdout and "garbage.JPEG" in proc.stdout
    m = summary(proc)
    assert (int(m["images"]), int(m["skipped"])) == (30, 2)
    top1, top5, n = _reference_accuracy(val, checkpoint)
    assert n == 30
    assert float(m["top1"]) == pytest.approx(top1, abs=1e-3)
    assert float(m["top5"]) == pytest.approx(top5, abs=1e-3)


@pytest.mark.parametrize("name", IMAGENET_CONFIGS)
def test_every_imagenet_config_loads_and_builds(name):
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(str(ROOT / "configs" / "ImageNet" / name))
    assert cfg.model.name == name[:-len("_eval.py")]  # each file is named after its model
    assert "data" in cfg.eval and "checkpoint" in cfg.eval
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert model.pretrained_cfg["num_classes"] == model.head.out_features
