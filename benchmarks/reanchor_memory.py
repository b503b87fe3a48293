#!/usr/bin/env python
"""Memory cost of re-anchoring (``rev_anchor_every=k``): peak training memory per sample on the
CPU for several k (0 = off), measured by benchmarks/memory_vs_depth.py (one fresh process per
measurement, difference of two batch sizes, pinned mmap threshold; see its docstring), next to
the prediction.

Prediction: with k > 0 the stack runs as ceil(depth / k) reversible chunks and each chunk keeps
its output pair of streams for its backward, so anchoring adds (chunks - 1) pairs, i.e.
(chunks - 1) * 2 * tokens * width * 4 bytes per sample in float32.

    python benchmarks/reanchor_memory.py --out docs/results/reanchor_memory
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(args, k, tmp):
    stem = Path(tmp) / f"k{k}"
    cmd = [sys.executable, str(HERE / "memory_vs_depth.py"), "--modes", "reversible",
           "--depths", *map(str, args.depths), "--width", str(args.width), "--heads",
           str(args.heads), "--img-size", str(args.img_size), "--batch-sizes",
           *map(str, args.batch_sizes), "--repeats", str(args.repeats), "--override",
           f"rev_anchor_every={k}", "--json", f"{stem}.json", "--markdown", f"{stem}.md",
           "--plot", f"{stem}.png", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"reanchor_memory: memory_vs_depth.py failed for k={k}: "
                 f"{proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(Path(f"{stem}.json").read_text())


def predicted_extra_mib(depth, k, tokens, width):
    chunks = math.ceil(depth / k) if k > 0 else 1
    return (chunks - 1) * 2 * tokens * width * 4 / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--anchor-every", type=int, nargs="+", default=[0, 4, 12])
    p.add_argument("--depths", type=int, nargs="+", default=[24, 48])
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-sizes", type=int, nargs=2, default=[2, 6])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="docs/results/reanchor_memory")
    args = p.parse_args(argv)
    tokens = (args.img_size // 16) ** 2
    runs, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.anchor_every:
            runs[k] = measure(args, k, tmp)
            print(f"k={k}: {runs[k]['per_sample_mib']['reversible']}", flush=True)
    off = args.anchor_every[0]
    for d in args.depths:
        for k in args.anchor_every:
            mib = runs[k]["per_sample_mib"]["reversible"][str(d)]
            rows.append(dict(depth=d, anchor_every=k, mib_per_sample=mib,
                             extra_mib=mib - runs[off]["per_sample_mib"]["reversible"][str(d)],
                             predicted_extra_mib=predicted_extra_mib(d, k, tokens, args.width)
                             - predicted_extra_mib(d, off, tokens, args.width),
                             by_repeat=runs[k]["per_sample_mib_by_repeat"]["reversible"][str(d)]))
    info = runs[off]["machine"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"machine": info, "settings": vars(args), "rows": rows,
                   "memory_vs_depth_runs": {str(k): v for k, v in runs.items()}}, f, indent=1)
    cpu = f"{info.get('cpu')}, {info.get('cores')} cores"
    lines = ["# Memory cost of re-anchoring (CPU, peak RSS per sample)", "",
             f"Rev-ViT width {args.width}, {args.heads} heads, {args.img_size}x{args.img_size} "
             f"({tokens} tokens), float32, batch sizes {args.batch_sizes[0]} and "
             f"{args.batch_sizes[1]}, median of {args.repeats} fresh processes per point; "
             f"{cpu}, torch {info.get('torch')}; "
             f"`python benchmarks/reanchor_memory.py {' '.join(argv or sys.argv[1:])}`.", "",
             "| depth | anchor every | MiB per sample | extra vs off | predicted extra "
             "(stored stream pairs) | per repeat |", "|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['anchor_every'] or 'off'} | {r['mib_per_sample']:.2f}"
                     f" | {r['extra_mib']:+.2f} | {r['predicted_extra_mib']:+.2f} | "
                     + ", ".join(f"{v:.2f}" for v in r["by_repeat"]) + " |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.md and {args.out}.json")


if __name__ == "__main__":
    main()
