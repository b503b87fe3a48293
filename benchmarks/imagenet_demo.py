#!/usr/bin/env python
"""The ImageNet training demo on the CPU: its accuracy and time, with and without the official
recipe's augmentation (RandAugment, random erasing, Mixup / CutMix).

Runs ``tools/train_imagenet.py`` (the built-in demo config, configs/ImageNet/rev_vit_test_train.py)
as a subprocess per variant and records the final ``* Acc@1`` line and the training time:

* ``demo``: the config as committed (no RandAugment, erasing or Mixup; 40 epochs);
* ``demo+recipe-aug``: RandAugment rand-m5-n1-mstd0.5-inc1, erasing 0.1, Mixup / CutMix
  (prob 0.2), colour jitter 0.4, 60 epochs.

    python benchmarks/imagenet_demo.py --out docs/results/imagenet_demo_cpu
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "demo": [],
    "demo+recipe-aug": ["train.epochs=60", "lr_multiplier.warmup_length=0.05",
                        "dataloader.train.augment.auto_augment=rand-m5-n1-mstd0.5-inc1",
                        "dataloader.train.augment.color_jitter=0.4",
                        "dataloader.train.augment.re_prob=0.1",
                        "dataloader.train.mixup.mixup_alpha=0.8",
                        "dataloader.train.mixup.cutmix_alpha=1.0",
                        "dataloader.train.mixup.prob=0.2", "train.label_smoothing=0.1"],
}
SUMMARY = re.compile(r"^\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) images (\d+)", re.M)
SPEED = re.compile(r"Overall training speed: (\d+) iterations in ([\d:]+) \(([\d.]+) s / it\)")


def run(name, extra):
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train_imagenet.py"),
                               f"train.output_dir={out}", *extra], cwd=str(ROOT),
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    top1, top5, images = SUMMARY.findall(proc.stdout)[-1]
    iters, wall, per_it = SPEED.search(proc.stdout).groups()
    return dict(variant=name, overrides=extra, top1=float(top1), top5=float(top5),
                # detectron2 times all iterations but its first 2
                test_images=int(images), iterations=int(iters) + 2, train_time=wall,
                s_per_iter=float(per_it))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default="docs/results/imagenet_demo_cpu")
    args = p.parse_args(argv)
    rows = []
    for name in args.variants:
        rows.append(run(name, VARIANTS[name]))
        print(json.dumps(rows[-1]), flush=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    info = {"python": platform.python_version(), "cpus": os.cpu_count(),
            "device": platform.processor() or platform.machine(), "load_avg_at_end": load,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"machine": info, "settings": vars(args), "rows": rows}, f, indent=1)
    lines = ["# ImageNet training demo on the CPU", "",
             f"`tools/train_imagenet.py` with configs/ImageNet/rev_vit_test_train.py (tiny "
             f"Rev-ViT, 8x8 patches, 1,000 generated shape images, 10 classes, 200 test images; chance "
             f"10 %); {info['cpus']} {info['device']} CPU cores shared with other jobs (load "
             f"average {load} at the end), {info['date']}; "
             f"`{' '.join(['python'] + sys.argv)}`.", "",
             "| variant | iterations | training time | s / it | Acc@1 | Acc@5 |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['iterations']} | {r['train_time']} | "
                     f"{r['s_per_iter']:.3f} | {r['top1']:.1f} | {r['top5']:.1f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.md")


if __name__ == "__main__":
    main()
