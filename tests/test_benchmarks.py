"""The benchmark scripts end to end on tiny settings: each runs, writes its outputs and orders
what it measures as expected where that is robust at tiny size (the inversion error by
precision). The full-size figures are the runs recorded in docs/results/, not checked here
(benchmarks/detector_memory.py: tests/test_detector_memory.py). memory_speed.py's handling of
out-of-memory errors and its row-by-row writing are tested in process with a fake step."""
import argparse
import collections
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


# --- memory_speed.py's out-of-memory handling and incremental writing, in process on the CPU:
# a fake training step raises the errors a GPU raises, at the batch sizes the test chooses.

def _load_memory_speed():
    spec = importlib.util.spec_from_file_location(
        "memory_speed", ROOT / "benchmarks" / "memory_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ms():
    return _load_memory_speed()


CPU = torch.device("cpu")


@pytest.mark.parametrize("err, oom", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
     True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"), True),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously "
                  "reported"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), False),
    (RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm`"),
     False),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (ValueError("out of memory"), False),  # not an error torch or a CUDA library raises
    (MemoryError(), False),  # the host, not the device
])
def test_memory_speed_oom_classification(ms, err, oom):
    assert ms.is_oom(err) is oom


def test_memory_speed_attempt_reraises_other_errors(ms):
    model = torch.nn.Linear(2, 2)

    def fail():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        ms.attempt(fail, [model], CPU)
    assert ms.attempt(lambda: 7, [model], CPU) == (True, 7)


def test_memory_speed_release_drops_gradients_and_cache(ms, monkeypatch):
    model = torch.nn.Linear(2, 2)
    model(torch.randn(3, 2)).sum().backward()
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    ms.release([model], torch.device("cuda"))
    assert all(p.grad is None for p in model.parameters()) and emptied == [1]


class _FakeStep:
    """A training step that runs out of memory above `limit` images, and above `fragmented`
    images from the third step at the same batch on (a largest batch that passed the search's
    two steps fails in the timing run). Each call first checks that no earlier failed attempt
    left gradients behind, then leaves some, as a backward that failed midway does."""

    def __init__(self, limit, fragmented=None):
        self.limit, self.fragmented = limit, fragmented
        self.steps = collections.Counter()

    def __call__(self, model, x, y, dtype, device):
        b = x.shape[0]
        assert all(p.grad is None for p in model.parameters()), "gradients left by a failure"
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        self.steps[b] += 1
        if b > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (batch {b})")
        if self.fragmented is not None and b > self.fragmented and self.steps[b] > 2:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                               "`cublasCreate(handle)`")
        model.zero_grad(set_to_none=True)


def _args(**kw):
    base = dict(img_size=4, batch=8, repeats=2, memory_batches=[2, 4], largest_batch=True)
    return argparse.Namespace(**dict(base, **kw))


def test_memory_speed_largest_batch_timing_falls_back(ms, monkeypatch):
    """The search finds 20; timing at 20 then fails (CUBLAS_STATUS_ALLOC_FAILED) and is
    repeated at 17 (7/8 of 20), which is recorded; the memory batch 24 does not fit: null."""
    fake = _FakeStep(limit=20, fragmented=18)
    monkeypatch.setattr(ms, "step", fake)
    model, row = torch.nn.Linear(3, 2), {}
    ms.measure_side(row, "rev", model, _args(memory_batches=[8, 24]), torch.float32, CPU)
    assert row["mib_per_image"] == {"rev": None}
    assert row["largest_batch"] == {"rev": 20}
    assert row["batch_at_largest"] == {"rev": 17}
    assert row["images_per_s_at_largest"]["rev"] > 0
    assert fake.steps[17] == 4  # warm-up and 3 timed steps
    assert all(p.grad is None for p in model.parameters())


def test_memory_speed_speed_batch_falls_back(ms, monkeypatch):
    """The interleaved timing at the requested batch 8 runs out of memory; it is repeated at
    7, 6, ... until 3 fits, and the row records both batches."""
    monkeypatch.setattr(ms, "step", _FakeStep(limit=3))
    models = {"plain": torch.nn.Linear(3, 2), "rev": torch.nn.Linear(3, 2)}
    row = ms.measure("vit_s", models, _args(), torch.float32, CPU)
    assert (row["batch"], row["batch_requested"]) == (3, 8)
    assert set(row["images_per_s"]) == {"plain", "rev"} and len(row["step_s"]["rev"]) == 2
    monkeypatch.setattr(ms, "step", _FakeStep(limit=0))
    failed = ms.measure("vit_b", models, _args(), torch.float32, CPU)
    assert failed["error"] == "out of memory at every batch tried"


def test_memory_speed_fallback_gives_up(ms):
    tried = []

    def timer(batch):
        tried.append(batch)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert ms.with_fallback(timer, 8, [], CPU) == (0, None)
    assert tried == [8, 7, 6, 5, 4, 3, 2, 1]


def test_memory_speed_writes_each_row_when_measured(ms, monkeypatch, tmp_path):
    """After each row OUT.json and OUT.md hold every row measured so far: a run killed while
    measuring the second row keeps the first (and the plot redraws from that JSON)."""

    class Killed(Exception):
        pass

    out = tmp_path / "ms"
    measured = []

    def fake_measure(label, models, args, dtype, device):
        if measured:  # the second row: the first must already be on disk
            data = json.loads(out.with_suffix(".json").read_text())
            assert [r["model"] for r in data["rows"]] == ["vit_s"]
            assert "| vit_s | float32 | rev |" in out.with_suffix(".md").read_text()
            raise Killed
        assert all(next(m.parameters()).device.type == "cpu" for m in models.values())
        measured.append(label)
        return {"model": label, "dtype": "float32", "batch": 2,
                "images_per_s": {k: 1.0 for k in models},
                "median_round_ratio": {k: 1.0 for k in models},
                "step_s": {k: [2.0] for k in models}}

    monkeypatch.setattr(ms, "build", lambda kind, *a, **kw: torch.nn.Linear(2, 2))
    monkeypatch.setattr(ms, "measure", fake_measure)
    with pytest.raises(Killed):
        ms.main(["--device", "cpu", "--sizes", "s", "b", "--dtypes", "float32",
                 "--sides", "plain", "rev", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["model"] for r in data["rows"]] == ["vit_s"]
    assert data["settings"]["sizes"] == ["s", "b"] and "machine" in data
    ms.plot(data, str(tmp_path / "partial.png"))
    assert (tmp_path / "partial.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".tmp_*"))  # the atomic writes left no temporary file


def test_memory_speed_reads_saved_results(ms, tmp_path):
    """The committed CPU run (saved before the out-of-memory fields existed) still plots and
    renders; so do rows with null memory, a fallback batch and a row that never fitted."""
    data = json.loads((ROOT / "docs" / "results" / "memory_speed_cpu.json").read_text())
    ms.plot(data, str(tmp_path / "old.png"))
    assert (tmp_path / "old.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sides = {"plain": 10.0, "rev": 8.0}
    rows = [dict(model="vit_s", dtype="float32", batch=6, batch_requested=8,
                 images_per_s=sides, median_round_ratio={"plain": 1.0, "rev": 1.25},
                 step_s={"plain": [0.6], "rev": [0.75]},
                 mib_per_image={"plain": None, "rev": 20.0},
                 largest_batch={"plain": 0, "rev": 40},
                 images_per_s_at_largest={"rev": 9.0}, batch_at_largest={"rev": 35}),
            dict(model="vit_l", dtype="float32", batch=0, error="out of memory at every batch "
                                                                  "tried")]
    args = argparse.Namespace(out=str(tmp_path / "new"))
    ms.write(rows, data["machine"], args)
    md = (tmp_path / "new.md").read_text()
    assert "| vit_s | float32 | plain | 10.0 @ 6 (asked 8: out of memory) |" in md
    assert "| out of memory |" in md and "| 40 (timed at 35) |" in md
    assert "| vit_l | float32 | | out of memory at every batch tried |" in md
    ms.plot(json.loads((tmp_path / "new.json").read_text()), str(tmp_path / "new.png"))
