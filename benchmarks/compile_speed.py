#!/usr/bin/env python
"""Training step time with ``torch.compile`` applied to F and G (the attention and MLP
sub-blocks) against the same model in eager mode, measured interleaved in one run.

Sides (same initialisation, same batch): ``rev`` (reversible backward, eager), ``rev+compile``
(reversible backward, F and G compiled with :func:`revvit_d2.modeling.reversible.
compile_subblocks`), and, with ``--plain``, the same two for plain autograd
(``use_rev_backprop=False``). Both sides call ``scaled_dot_product_attention``. Each round
times one step (forward, cross-entropy, backward) of every side in turn, so machine noise hits
all sides alike; the speed-up is the median over rounds of (eager time / compiled time) taken
within each round. The first compiled step, which includes compilation, is reported apart.

Example (the committed CPU run; on a GPU pass ``--device cuda``):

    python benchmarks/compile_speed.py --model rev_vit_s --batch 8 --plain \
        --out docs/results/compile_speed_cpu
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

import revvit_d2
from revvit_d2.modeling.reversible import compile_subblocks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_speed import machine, step, sync  # noqa: E402


def build(args, use_rev_backprop, compiled, device):
    torch.manual_seed(0)
    model = revvit_d2.create_model(args.model, img_size=args.img_size, drop_path_rate=0.0,
                                   use_rev_backprop=use_rev_backprop)
    model = model.to(device).train()
    if compiled:
        kw = dict(backend=args.backend)
        if args.mode:
            kw["mode"] = args.mode
        compile_subblocks(model, **kw)
    return model


def timed_step(model, x, y, dtype, device):
    sync(device)
    t = time.perf_counter()
    step(model, x, y, dtype, device)
    sync(device)
    return time.perf_counter() - t


def run(args):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    pairs = [("rev", True)] + ([("plain", False)] if args.plain else [])
    models = {}
    for name, rev in pairs:
        models[name] = build(args, rev, False, device)
        models[name + "+compile"] = build(args, rev, True, device)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, models['rev'].num_classes, (args.batch,), device=device)

    first = {k: timed_step(m, x, y, dtype, device) for k, m in models.items()}
    for m in models.values():  # a second warm-up step: lazy allocations, oneDNN/cuDNN choices
        step(m, x, y, dtype, device)
    times = {k: [] for k in models}
    for r in range(args.repeats):
        for k, m in models.items():
            times[k].append(timed_step(m, x, y, dtype, device))
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(
            f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    speedups = {}
    for name, _ in pairs:
        ratios = [e / c for e, c in zip(times[name], times[name + "+compile"])]
        speedups[name] = dict(median=statistics.median(ratios), min=min(ratios),
                              max=max(ratios), per_round=ratios)
    return dict(first_step_s=first, step_s={k: statistics.median(v) for k, v in times.items()},
                step_s_all=times, speedup=speedups)


def write(result, info, args, argv):
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"machine": info, "settings": vars(args), "result": result}, f, indent=1)
    where = info.get("gpu") or f"{info['cpu']}, {info['cores']} cores"
    lines = [f"# torch.compile of F and G: training step time ({where})", "",
             f"`python benchmarks/compile_speed.py {' '.join(argv)}`; torch {info['torch']}, "
             f"{info['date']}. Model `{args.model}`, batch {args.batch}, {args.img_size}x"
             f"{args.img_size}, {args.dtype}, backend `{args.backend}`"
             + (f", mode `{args.mode}`" if args.mode else "") + f", {args.repeats} interleaved "
             "rounds" + (f", {args.threads} torch thread(s); 1-minute load average "
                         f"{info['load_average_1min_at_start']} at the start, "
                         f"{info['load_average_1min_at_end']} at the end"
                         if args.device == "cpu" else "") + ".", "",
             "| side | median step (s) | first step incl. compile (s) | speed-up eager/compiled, "
             "median of per-round ratios [min, max] |",
             "|---|---:|---:|---|"]
    for k, t in result["step_s"].items():
        sp = result["speedup"].get(k.replace("+compile", "")) if k.endswith("+compile") else None
        cell = f"{sp['median']:.3f}x [{sp['min']:.3f}, {sp['max']:.3f}]" if sp else ""
        lines.append(f"| {k} | {t:.3f} | {result['first_step_s'][k]:.1f} | {cell} |")
    lines += ["", "Speed-up > 1: the compiled side's step is that many times faster than the eager "
              "side's, measured in the same round."]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="rev_vit_s")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", default="inductor")
    p.add_argument("--mode", default="", help="torch.compile mode (default: none given)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--plain", action="store_true", help="also plain autograd eager vs compiled")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch threads on the CPU")
    p.add_argument("--out", default="docs/results/compile_speed")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    info = machine(torch.device(args.device))
    info["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    result = run(args)
    info["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    write(result, info, args, argv)
    print(json.dumps({k: v["median"] for k, v in result["speedup"].items()}))
    print(f"wrote {args.out}.md and {args.out}.json")


if __name__ == "__main__":
    main()
