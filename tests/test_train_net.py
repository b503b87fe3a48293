"""tools/train_net.py end to end: a short training on the synthetic shapes set that must learn,
resume from the last checkpoint, and one-line errors for bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("args,message", [
    (["--config-file", "nope.py"], "config file not found: nope.py"),
    (["--config-file", str(CONFIG), "train.init_checkpoint=/no/such.pyth"],
     "train.init_checkpoint not found"),
    (["--config-file", str(CONFIG), "model.backbone.net.no_such_arg=3"], "cannot build the model"),
])
def test_bad_input_is_one_line_and_nonzero(args, message, tmp_path):
    proc = _run(args + [f"train.output_dir={tmp_path}/out"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _metrics(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.json").read_text().splitlines()]
    return [r for r in rows if "total_loss" in r]


@pytest.mark.slow
def test_short_training_learns_and_resumes(tmp_path):
    out = tmp_path / "out"
    common = ["--config-file", str(CONFIG), f"train.output_dir={out}", "train.log_period=10",
              "train.checkpointer.period=40", "train.eval_period=100000"]
    first = _run(common + ["train.max_iter=40"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "model_0000039.pth").exists() and (out / "last_checkpoint").exists()
    losses = _metrics(out)
    assert losses[-1]["total_loss"] < losses[0]["total_loss"]
    # options come before the key=value overrides (detectron2's parser takes the rest as opts)
    resumed = _run(["--resume"] + common + ["train.max_iter=60"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "Starting training from iteration 40" in log
    assert max(r["iteration"] for r in _metrics(out)) == 59
