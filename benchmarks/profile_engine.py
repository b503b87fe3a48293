#!/usr/bin/env python
"""Where the reversible backward's extra time goes: torch.profiler, operator by operator, for
one training step of Rev-ViT with the reversible backward and with plain autograd (the same
model, ``use_rev_backprop=False``), on the CPU.

The reversible step should cost the plain step plus one more forward of every F and G (the
recomputation), plus two subtractions per block (the inversion). The table lists every
operator's self time per step on both sides and their difference; ``RevBackProp`` /
``RevBackPropBackward`` rows are the engine's own time outside any operator (Python, autograd
bookkeeping, freeing memory). One torch thread by default, so that the profile is not a
measure of thread scheduling on a shared machine.

Example::

    python benchmarks/profile_engine.py --out docs/results/engine_profile_cpu
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import command_line, machine_info, measured_on  # noqa: E402


def profile_side(model, x, y, steps):
    """{operator: (self milliseconds per step, calls per step)} over `steps` profiled steps."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # warm-up
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            F.cross_entropy(model(x), y).backward()
            model.zero_grad(set_to_none=False)
    return {e.key: (e.self_cpu_time_total / 1e3 / steps, e.count // steps)
            for e in prof.key_averages()}


def run(args, argv):
    import torch

    import revvit_d2

    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch,))
    sides = {}
    for name, rev in (("plain", False), ("reversible", True)):
        torch.manual_seed(0)
        model = revvit_d2.create_model(
            "rev_vit_s", embed_dim=args.width, num_heads=max(1, args.width // 64),
            depth=args.depth, img_size=args.img_size, drop_path_rate=0.0, num_classes=10,
            use_rev_backprop=rev).train()
        sides[name] = profile_side(model, x, y, args.steps)
    keys = sorted(set(sides["plain"]) | set(sides["reversible"]),
                  key=lambda k: -(sides["reversible"].get(k, (0, 0))[0]
                                  - sides["plain"].get(k, (0, 0))[0]))
    total = {s: sum(v[0] for v in sides[s].values()) for s in sides}
    rows = [dict(op=k, plain_ms=sides["plain"].get(k, (0, 0))[0],
                 plain_calls=sides["plain"].get(k, (0, 0))[1],
                 rev_ms=sides["reversible"].get(k, (0, 0))[0],
                 rev_calls=sides["reversible"].get(k, (0, 0))[1]) for k in keys]
    info = machine_info()
    info["threads"] = args.threads
    out = dict(machine=info, command=command_line(__file__, argv), settings=vars(args),
               total_ms=total, ratio=total["reversible"] / total["plain"], rows=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(out, args.top))
    if not args.quiet:
        print(Path(args.out + ".md").read_text())
    return 0


def markdown(out, top):
    s, m = out["settings"], out["machine"]
    lines = [
        "# Profile of one training step: reversible backward vs plain autograd (CPU)", "",
        f"Rev-ViT width {s['width']}, depth {s['depth']}, batch {s['batch']}, "
        f"{s['img_size']}x{s['img_size']}, fp32, {s['threads']} torch thread(s); torch.profiler "
        f"self CPU time per step, mean of {s['steps']} profiled steps after 2 warm-up steps. "
        f"Total: plain {out['total_ms']['plain']:.1f} ms, reversible "
        f"{out['total_ms']['reversible']:.1f} ms, ratio **{out['ratio']:.3f}x**.", "",
        f"The {top} operators whose time grows most (ms per step, calls per step):", "",
        "| operator | plain ms (calls) | reversible ms (calls) | difference ms |",
        "|---|---:|---:|---:|"]
    for r in out["rows"][:top]:
        lines.append(f"| `{r['op'][:70]}` | {r['plain_ms']:.1f} ({r['plain_calls']}) | "
                     f"{r['rev_ms']:.1f} ({r['rev_calls']}) | {r['rev_ms'] - r['plain_ms']:+.1f} |")
    lines += ["", measured_on(m, out["command"], raw="the JSON beside this file"), ""]
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default="docs/results/engine_profile_cpu")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return run(parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
