#!/usr/bin/env python
"""Forward and forward+backward time of torchvision's ``roi_align`` on the CPU, for the pooler
settings of the built-in detection demo (64-channel p2 maps of a batch of 4 images at stride 4,
256 RoIs: the box pooler's 7x7 and the mask pooler's 14x14 outputs, 1 or 2 samples per bin).

Each setting is warmed up twice and then timed over ``--reps`` calls. Settings run one after the
other in one process, so compare them as ratios within one run.

    OMP_NUM_THREADS=2 python benchmarks/roi_align_cpu.py
"""
import argparse
import time

import torch
from torchvision.ops import roi_align


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rois", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(4, 64, 36, 36, requires_grad=True)
    n = args.rois
    batch_index = torch.randint(0, 4, (n,)).float()
    xy = torch.rand(n, 2) * 100
    wh = torch.rand(n, 2) * 60 + 10
    rois = torch.cat([batch_index[:, None], xy, xy + wh], 1)

    print(f"threads {torch.get_num_threads()}, {n} RoIs, input {tuple(x.shape)}")
    print("| output | samples per bin | forward ms | forward+backward ms |")
    print("|---:|---:|---:|---:|")
    for out, ratio in [(7, 2), (7, 1), (14, 2), (14, 1)]:
        for _ in range(2):
            roi_align(x, rois, out, 0.25, ratio, True).sum().backward()
        t = time.perf_counter()
        for _ in range(args.reps):
            roi_align(x, rois, out, 0.25, ratio, True)
        forward = (time.perf_counter() - t) / args.reps
        t = time.perf_counter()
        for _ in range(args.reps):
            y = roi_align(x, rois, out, 0.25, ratio, True)
            y.backward(torch.ones_like(y))
        both = (time.perf_counter() - t) / args.reps
        print(f"| {out}x{out} | {ratio} | {forward * 1e3:.1f} | {both * 1e3:.1f} |")


if __name__ == "__main__":
    main()
