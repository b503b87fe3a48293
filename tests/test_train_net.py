"""tools/train_net.py end to end: a short training on the synthetic shapes set that must learn and
resume from the last checkpoint (bad input: tests/test_bad_input.py; exact resume after SIGKILL:
tests/test_resume.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from revvit_d2.utils.io import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "train_net.py"
CONFIG = ROOT / "configs" / "COCO" / "mask_rcnn_revvit_synthetic.py"


def _run(args, tmp_path, timeout=900):
    env = dict(os.environ, REVVIT_DATASETS=str(ROOT / "datasets"), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, str(TOOL)] + args, capture_output=True, text=True,
                          cwd=str(tmp_path), env=env, timeout=timeout)


def test_help():
    proc = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--eval-only" in proc.stdout and "--resume" in proc.stdout


def _metrics(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.json").read_text().splitlines()]
    return [r for r in rows if "total_loss" in r]


@pytest.mark.slow
def test_short_training_learns_and_resumes(tmp_path):
    out = tmp_path / "out"
    common = ["--config-file", str(CONFIG), f"train.output_dir={out}", "train.log_period=5",
              "train.checkpointer.period=20", "dataloader.evaluator=null"]
    first = _run(common + ["train.max_iter=20"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "model_0000019.pth").exists() and (out / "last_checkpoint").exists()
    losses = _metrics(out)
    assert losses[-1]["total_loss"] < losses[0]["total_loss"]
    # options come before the key=value overrides (detectron2's parser takes the rest as opts)
    resumed = _run(["--resume"] + common + ["train.max_iter=30"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "Starting training from iteration 20" in log
    assert max(r["iteration"] for r in _metrics(out)) == 29
    # every checkpoint the tool wrote is data only: loads with weights_only=True (security.md)
    names = sorted(p.name for p in out.glob("model_*.pth"))
    assert "model_0000019.pth" in names and "model_final.pth" in names, names
    for name in names:
        data = read_checkpoint(out / name)
        assert {"model", "trainer", "iteration", "seed"} <= set(data)
