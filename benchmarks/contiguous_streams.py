#!/usr/bin/env python
"""The effect of entering the reversible stack with contiguous streams, side by side (CPU).

The patch embedding's tokens are a transposed view of the convolution's output;
``RevModelBase._run`` copies them into contiguous memory once before the blocks. This script
times one training step of the same Rev-ViT with that copy (as shipped) and without it (the
streams left as the transposed view, which is what the models did before), interleaved over
``--rounds`` rounds, for the reversible backward and for plain autograd, and reports the median
per-round ratio without / with.

Example::

    python benchmarks/contiguous_streams.py --out docs/results/contiguous_streams_cpu
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import command_line, machine_info, measured_on  # noqa: E402


def _strided_run(self, blocks, x1, x2, thw, names=None):
    """``RevModelBase._run`` without the contiguous copy (the streams stay a transposed view)."""
    from revvit_d2.modeling.reversible import reversible_stack

    return reversible_stack(blocks, x1, x2, thw, self.engine, names)


def run(args, argv):
    import torch
    import torch.nn.functional as F

    import revvit_d2
    from revvit_d2.modeling.base import RevModelBase

    torch.set_num_threads(args.threads)
    shipped = RevModelBase._run
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch,))
    results = {}
    for engine in ("reversible", "plain"):
        torch.manual_seed(0)
        model = revvit_d2.create_model(
            "rev_vit_s", embed_dim=args.width, num_heads=max(1, args.width // 64),
            depth=args.depth, drop_path_rate=0.0, num_classes=10,
            use_rev_backprop=engine == "reversible").train()

        def step(run):
            RevModelBase._run = run
            try:
                t0 = time.perf_counter()
                F.cross_entropy(model(x), y).backward()
                model.zero_grad(set_to_none=False)
                return time.perf_counter() - t0
            finally:
                RevModelBase._run = shipped

        step(shipped), step(_strided_run)  # warm-up
        times = {"contiguous": [], "strided": []}
        for _ in range(args.rounds):
            times["contiguous"].append(step(shipped))
            times["strided"].append(step(_strided_run))
        results[engine] = dict(
            ratio_strided_over_contiguous=statistics.median(
                s / c for s, c in zip(times["strided"], times["contiguous"])),
            step_s=times)
    info = machine_info()
    info["threads"] = args.threads
    out = dict(machine=info, command=command_line(__file__, argv), settings=vars(args),
               results=results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["# Contiguous streams into the reversible stack: step time without / with (CPU)", "",
             f"Rev-ViT width {args.width}, depth {args.depth}, batch {args.batch}, "
             f"{args.img_size}x{args.img_size}, fp32, {args.threads} torch threads; median over "
             f"{args.rounds} interleaved rounds of the per-round ratio.", "",
             "| engine | strided / contiguous step time | median step, contiguous (s) |",
             "|---|---:|---:|"]
    for engine, r in results.items():
        lines.append(f"| {engine} | {r['ratio_strided_over_contiguous']:.3f}x | "
                     f"{statistics.median(r['step_s']['contiguous']):.2f} |")
    lines += ["", measured_on(info, out["command"]), ""]
    Path(args.out + ".md").write_text("\n".join(lines))
    if not args.quiet:
        print(Path(args.out + ".md").read_text())
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/results/contiguous_streams_cpu")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return run(parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
