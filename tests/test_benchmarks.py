"""The benchmark scripts end to end on tiny settings: each runs, writes its outputs and orders
what it measures as expected where that is robust at tiny size (the inversion error by
precision). The full-size figures are the runs recorded in docs/results/, not checked here
(benchmarks/detector_memory.py: tests/test_detector_memory.py)."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "memory_vs_depth.py"
MODES = ["reversible", "plain", "checkpoint"]
DEPTHS = [2, 4]


@pytest.mark.slow
def test_memory_vs_depth_smoke(tmp_path):
    out_json, out_md, out_png = tmp_path / "m.json", tmp_path / "m.md", tmp_path / "m.png"
    # 128x128 and batch sizes 2/8 rather than smaller: at 64x64 the per-sample signal is below
    # the allocator's noise, and batch size 1 takes a hungrier oneDNN convolution path (see the
    # script's docstring), both of which can make a per-sample value negative.
    cmd = [sys.executable, str(SCRIPT), "--depths", *map(str, DEPTHS), "--img-size", "128",
           "--width", "64", "--heads", "2", "--batch-sizes", "2", "8", "--repeats", "1",
           "--json", str(out_json), "--markdown", str(out_md), "--plot", str(out_png), "--quiet"]
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    data = json.loads(out_json.read_text())
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"]
    assert len(data["raw"]) == len(MODES) * len(DEPTHS) * 2
    assert all(r["peak_kib"] > 0 and r["malloc_mmap_threshold"] == "65536" for r in data["raw"])
    for mode in MODES:
        for d in DEPTHS:
            v = data["per_sample_mib"][mode][str(d)]
            assert math.isfinite(v) and v > 0, (mode, d, v)

    md = out_md.read_text()
    header = next(line for line in md.splitlines() if line.startswith("| depth"))
    assert [c.strip() for c in header.strip("|").split("|")][1:4] == MODES
    for d in DEPTHS:
        row = next(line for line in md.splitlines() if line.startswith(f"| {d} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:4]
        assert all(re.fullmatch(r"\d+\.\d", c) and float(c) > 0 for c in cells), row
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_vs_depth_child_failure_is_one_line(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--model", "no_such_model", "--depths", "2",
           "--modes", "plain", "--json", str(tmp_path / "m.json"),
           "--markdown", str(tmp_path / "m.md"), "--plot", str(tmp_path / "m.png"), "--quiet"]
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "child failed" in lines[0] and "no_such_model" in lines[0], lines
    assert not (tmp_path / "m.json").exists()


@pytest.mark.slow
def test_memory_speed_harness_runs_on_cpu(tmp_path):
    """CPU run of the GPU harness: speed rows for every side, no memory columns."""
    out = tmp_path / "ms"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "memory_speed.py"), "--device", "cpu",
           "--sizes", "s", "--depths", "2", "--img-size", "32", "--batch", "2", "--repeats", "1",
           "--dtypes", "float32", "--parallel", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert set(rows[0]["images_per_s"]) == {"plain", "rev", "ckpt", "rev_parallel"}
    assert all(v > 0 for v in rows[0]["images_per_s"].values())
    assert "| vit_s@2 | float32 | rev |" in out.with_suffix(".md").read_text()
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --plot-only redraws the plot from the JSON alone
    png.unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_speed.py"),
                           "--plot-only", str(out.with_suffix(".json"))],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_reconstruction_error_orders_precisions(tmp_path):
    out = tmp_path / "re"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "reconstruction_error.py"), "--depths", "6",
           "--width", "64", "--heads", "2", "--tokens", "16", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["precision"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    err = {k: r["reconstruction_rel_err"] for k, r in rows.items()}
    assert err["float64"] < 1e-12 < err["float32"] < 1e-5 < err["bfloat16-streams"]
    assert all(r["input_grad_cosine"] > 0.999 for r in rows.values())


@pytest.mark.slow
def test_reconstruction_error_with_anchoring(tmp_path):
    out = tmp_path / "ra"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "reconstruction_error.py"), "--depths", "4",
           "--width", "64", "--heads", "2", "--tokens", "16", "--device", "cpu",
           "--precisions", "float32", "--anchor-every", "0", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["anchor_every"] for r in rows] == [0, 2]
    assert all(r["param_grad_min_cosine"] > 0.9999 for r in rows)
    assert "| float32 | 2 | 4 |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_compile_speed_runs_on_cpu(tmp_path):
    """The compile benchmark end to end on a tiny model with the fast "aot_eager" backend."""
    out = tmp_path / "cs"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compile_speed.py"), "--device", "cpu",
           "--model", "rev_vit_test", "--img-size", "64", "--batch", "2", "--repeats", "2",
           "--backend", "aot_eager", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())["result"]
    assert set(result["step_s"]) == {"rev", "rev+compile"}
    assert len(result["speedup"]["rev"]["per_round"]) == 2
    assert "| rev+compile |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_reanchor_memory_smoke(tmp_path):
    out = tmp_path / "rm"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "reanchor_memory.py"), "--depths", "4",
           "--anchor-every", "0", "2", "--width", "64", "--heads", "2", "--img-size", "128",
           "--repeats", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["depth"], r["anchor_every"]) for r in rows] == [(4, 0), (4, 2)]
    assert rows[0]["extra_mib"] == 0 and rows[1]["predicted_extra_mib"] > 0
    assert all(math.isfinite(r["mib_per_sample"]) for r in rows)
