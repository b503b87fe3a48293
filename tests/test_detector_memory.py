"""benchmarks/detector_memory.py: the real COCO configs, shrunk, measured end to end (output
format); the reversible trunk measured against the same trunk under plain autograd (the saving
the benchmark exists to show); the table arithmetic (slope, heads = detector - backbone, ratios)
on hand-made numbers. The full-size figures are the run recorded in
docs/results/detector_memory.md."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "detector_memory.py"
TINY = ["model.backbone.net.depth=2", "model.backbone.net.embed_dim=64",
        "model.backbone.net.num_heads=2", "model.roi_heads.batch_size_per_image=16"]

sys.path.insert(0, str(SCRIPT.parent))
import detector_memory  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_detector_memory_end_to_end(tmp_path, device):
    out = tmp_path / "dm"
    cmd = [sys.executable, str(SCRIPT), "--device", device, "--img-size", "128",
           "--variants", "revvit_b", "vit_b", "--parts", "detector", "--steps", "1",
           "--jobs", "2", "--threads", "1", "--out", str(out), "--quiet"]
    for item in TINY:
        cmd += ["--override", item]
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data) == {"machine", "settings", "command", "mib_per_image", "ratio_to_revvit_b",
                         "raw"}
    assert data["machine"]["cpu"] and data["machine"]["torch"] and data["machine"]["cores"] >= 1
    s = data["settings"]
    assert (s["device"], s["img_size"], s["batch_sizes"]) == (device, 128, [2, 4])
    assert ("gpu" in data["machine"]) == (device == "cuda")
    assert s["configs"]["vit_b"] == "configs/COCO/mask_rcnn_vit_b_100ep.py"
    assert len(data["raw"]) == 2 * 2  # variants x batch sizes
    for r in data["raw"]:
        assert r["peak_mib"] > 0 and r["malloc_mmap_threshold"] == "65536"
        assert r["overrides"] == TINY and r["n_params_backbone"] < 10**6  # the overrides applied
    per_image = data["mib_per_image"]["float32"]["detector"]
    assert set(per_image) == {"revvit_b", "vit_b"}
    assert all(math.isfinite(v) and v > 0 for v in per_image.values()), per_image
    assert set(data["ratio_to_revvit_b"]["float32"]["detector"]) == {"vit_b/revvit_b"}

    md = out.with_suffix(".md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| float32 | whole detector |"))
    assert row.count("|") == 6 and row.rstrip(" |").endswith("x")
    assert "python benchmarks/detector_memory.py --device cuda" in md


@pytest.mark.slow
def test_reversible_trunk_needs_less_memory_per_image(tmp_path):
    """The Rev-ViT trunk of the COCO config (8 blocks, 96 wide, 384x384: 576 tokens), reversible
    backward against plain autograd, measured by the benchmark's own children (peak RSS of fresh
    processes, batch 2 and 4). Plain autograd keeps every block's activations (about 35 MiB per
    image here), the reversible backward only the last block's output (about 9 MiB, most of it
    the input image and patch embedding): half is a wide margin on both sides."""
    out = tmp_path / "trunk"
    cmd = [sys.executable, str(SCRIPT), "--img-size", "384", "--variants", "revvit_b",
           "revvit_b_autograd", "--parts", "backbone", "--steps", "2", "--jobs", "2",
           "--threads", "1", "--out", str(out), "--quiet",
           "--override", "model.backbone.net.depth=8", "--override",
           "model.backbone.net.embed_dim=96", "--override", "model.backbone.net.num_heads=2"]
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert len({r["n_params_backbone"] for r in data["raw"]}) == 1  # the same trunk twice
    per_image = data["mib_per_image"]["float32"]["backbone"]
    assert 0 < per_image["revvit_b"] < 0.5 * per_image["revvit_b_autograd"], per_image


def _raw(variant, part, batch, peak):
    return dict(variant=variant, part=part, batch=batch, dtype="float32", peak_mib=peak)


def test_per_image_table_slope_heads_and_ratios():
    raw = [_raw("revvit_b", "backbone", 2, 100), _raw("revvit_b", "backbone", 4, 110),
           _raw("revvit_b", "detector", 2, 300), _raw("revvit_b", "detector", 4, 400),
           _raw("vit_b", "backbone", 2, 100), _raw("vit_b", "backbone", 4, 180),
           _raw("vit_b", "detector", 2, 300), _raw("vit_b", "detector", 4, 500),
           _raw("vit_b", "detector", 4, 520)]  # a repeat: the median of 500 and 520 is used
    table = detector_memory.per_image_table(raw, ["float32"], ["backbone", "detector"],
                                            ["revvit_b", "vit_b"], 2, 4)
    t = table["float32"]
    assert t["backbone"] == {"revvit_b": 5.0, "vit_b": 40.0}
    assert t["detector"] == {"revvit_b": 50.0, "vit_b": 105.0}
    assert t["heads"] == {"revvit_b": 45.0, "vit_b": 65.0}
    r = detector_memory.ratios(table)["float32"]
    assert r["backbone"] == {"vit_b/revvit_b": 8.0}
    assert r["detector"] == {"vit_b/revvit_b": 2.1}
