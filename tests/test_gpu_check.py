"""benchmarks/gpu_check.sh in its CPU smoke mode (GPU_CHECK_SMOKE=1): every step of the one-call
GPU check runs at tiny sizes, leaves its results, and the summary names the machine."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step(tmp_path):
    out = tmp_path / "gpu_check"
    env = dict(os.environ, GPU_CHECK_SMOKE="1", RESULTS_DIR=str(out))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=str(ROOT),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert [s["name"] for s in summary["steps"]] == [
        "memory_speed", "pytest_cuda", "largest_batch", "detector", "compile", "fsdp_memory"]
    assert all(s["status"] == "ok" for s in summary["steps"]), summary["steps"]
    assert summary["smoke"] is True and summary["machine"]["gpu"] is None
    assert summary["cuda_tests"]["failed"] == 0
    rows = json.loads((out / "memory_speed.json").read_text())["rows"]
    assert {"plain", "rev", "ckpt", "rev_parallel", "rev_hybrid"} <= set(rows[0]["images_per_s"])
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert "GPU check:" in (out / "gpu_check.md").read_text()
    fsdp = json.loads((out / "fsdp_memory.json").read_text())
    assert {r["world"] for r in fsdp["rows"]} == {1}  # the world of one GPU


def test_gpu_check_refuses_without_a_gpu_outside_smoke_mode(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = dict(os.environ, GPU_CHECK_SMOKE="0", RESULTS_DIR=str(tmp_path / "o"))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=str(ROOT),
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device visible (for the CPU smoke run: GPU_CHECK_SMOKE=1)"]
