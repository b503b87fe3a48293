"""End to end: tools/train_net.py trains the built-in Rev-ViT Mask R-CNN demo exactly as
`make demo` does (the demo config, unchanged: 800 iterations from scratch on the CPU) and
COCOEvaluator scores it on the *validation* split. The detector must reach the demo's target,
box AP >= 30.

Chance here is an AP of about 0: a detector that has not learned scores its random boxes
against 1-3 shapes per image. The config pins the seed (a test must fail because the detector
stopped learning, not because of a draw) and the test pins 2 OpenMP threads, as on the 2-core
machines `make demo` is specified for. Measured on the dev machine with this config (`make
demo`): box AP 41.2, AP50 61.4, mask AP 29.4 (docs/detection.md). The thread count and the CPU
model change the floating-point results, so the secondary thresholds sit well below those.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "train_net.py"
CONFIG = ROOT / "configs" / "COCO" / "mask_rcnn_revvit_synthetic.py"

MIN_BOX_AP = 30.0  # the demo's target (issue #4)
MIN_BOX_AP50 = 45.0
MIN_MASK_AP = 15.0


@pytest.mark.slow
def test_demo_detector_reaches_its_target_on_validation_split(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, REVVIT_DATASETS=str(ROOT / "datasets"), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--config-file", str(CONFIG), f"train.output_dir={out}"],
        capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    evals = [r for r in rows if "bbox/AP" in r]
    assert len(evals) == 1, evals  # the EvalHook after the last iteration
    result = evals[0]
    assert result["bbox/AP"] >= MIN_BOX_AP, result
    assert result["bbox/AP50"] >= MIN_BOX_AP50, result
    assert result["segm/AP"] >= MIN_MASK_AP, result
    # the tables a detectron2 user expects were printed
    assert "Evaluation results for bbox" in proc.stdout + proc.stderr
