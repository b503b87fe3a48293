#!/usr/bin/env python
"""Peak training memory per sample versus depth on the CPU: reversible vs plain vs checkpointing.

For every (mode, depth, batch size) the script starts ONE FRESH PROCESS (itself, with
``--child``) that builds the model, runs training steps (forward, cross-entropy loss, backward)
at that batch size and reports its peak resident set size (``ru_maxrss``, a high-water mark of
the whole process). The per-sample memory of a (mode, depth) is

    (peak(b2) - peak(b1)) / (b2 - b1)

which cancels everything that does not scale with the batch: the interpreter and libraries,
the weights, their gradients, allocator slack of fixed size.

Modes:
    reversible  ``use_rev_backprop=True``: the memory-saving reversible backward.
    plain       ``use_rev_backprop=False``: the same model, ordinary autograd.
    checkpoint  ``use_rev_backprop=False, act_checkpoint=True``: ordinary autograd with one
                ``torch.utils.checkpoint`` per block (the usual baseline).

Why ``MALLOC_MMAP_THRESHOLD_=65536`` (set by the parent in every child's environment): glibc's
malloc raises its mmap threshold dynamically each time a large block is freed, after which
activation-sized buffers come from the heap and stay resident once freed. RSS then reflects the
sum of everything ever allocated rather than what was alive at once, and the reversible savings
vanish from the numbers. A fixed threshold makes every buffer >= 64 KiB its own mmap, returned to
the kernel on free, so peak RSS tracks the peak of live tensors.

Warm-up: the child runs ``--steps`` (default 2) identical steps, the first being the warm-up,
with ``zero_grad(set_to_none=False)`` so gradients stay allocated between steps as in a training
loop. ``ru_maxrss`` cannot be reset, so the warm-up cannot remove anything from the peak; the
reported peak is max(step 1, step 2). What it buys is a clean separation: in the first step the
parameter gradients are allocated *during* the backward, while activations are being freed, so
the peak is the maximum over time of (gradients so far + live activations) and where that
maximum falls shifts with the batch size; the difference between two batch sizes then mixes
gradient and activation memory (measured on Rev-ViT 192 wide: reversible 2.8 MiB/sample and
checkpointing 2.8 MiB/sample at 48 blocks from the first step alone, against 3.9 and 17.4 from
the second). In the second step the gradients exist from the start, so the peak is
(constant) + (largest live activation set), which is exactly what the batch difference isolates.
It also folds lazy one-time allocations (oneDNN primitives and scratch, autograd threads, the
extra imports of ``torch.utils.checkpoint``) into the constant. The JSON keeps the high-water
mark after import, after model build and after every step.

Batch size 1 is a poor first batch size on the CPU: oneDNN's convolution backward (the patch
embedding) takes a different, hungrier path at N=1 (about 4.5 MiB more than at N=2 for a 64x64
input), which makes the per-sample figure wrong, even negative for small models. Very small
batches also sit on a knee where fixed-size scratch buffers dominate the peak; 2 and 6 give the
same per-sample figure as 4 and 10 within about 0.2 MiB for the default model.

Examples::

    python benchmarks/memory_vs_depth.py                       # the default run (docs/results/)
    python benchmarks/memory_vs_depth.py --depths 4 8 --modes reversible plain \\
        --img-size 64 --width 64 --heads 2 --batch-sizes 1 2 --json /tmp/m.json \\
        --markdown /tmp/m.md --plot /tmp/m.png
    # another create_model name, keeping its own width/heads (0 = keep the variant's value):
    python benchmarks/memory_vs_depth.py --model rev_vit_b --width 0 --heads 0 --depths 12 24
"""
import argparse
import ast
import json
import os
import statistics
import sys
import time
from pathlib import Path

from peak_rss import (MALLOC_ENV, ROOT, command_line, dispatch, machine_info, maxrss_kib,
                      measure_in_child, measured_on)

MODES = ("reversible", "plain", "checkpoint")
MODE_KWARGS = {
    "reversible": dict(use_rev_backprop=True),
    "plain": dict(use_rev_backprop=False),
    "checkpoint": dict(use_rev_backprop=False, act_checkpoint=True),
}
NUM_CLASSES = 10


# --------------------------------------------------------------------------------------------
# child: one measurement
# --------------------------------------------------------------------------------------------

def _model_kwargs(args, depth: int, mode: str) -> dict:
    """create_model overrides for one measurement (img_size only when it differs)."""
    import revvit_d2

    kw = dict(MODE_KWARGS[mode])
    kw[args.depth_kwarg] = depth
    kw["num_classes"] = NUM_CLASSES
    kw["drop_path_rate"] = 0.0
    if args.width:
        kw["embed_dim"] = args.width
    if args.heads:
        kw["num_heads"] = args.heads
    cfg_size = tuple(revvit_d2.get_pretrained_cfg(args.model)["input_size"][-2:])
    if cfg_size != (args.img_size, args.img_size):
        kw["img_size"] = args.img_size
    for item in args.override:
        key, _, value = item.partition("=")
        try:
            kw[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kw[key] = value
    return kw


def run_child(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    import revvit_d2

    after_import = maxrss_kib()
    torch.manual_seed(0)
    kwargs = _model_kwargs(args, args.depth, args.mode)
    model = revvit_d2.create_model(args.model, **kwargs)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    target = torch.randint(0, NUM_CLASSES, (args.batch,))
    after_build = maxrss_kib()

    peaks, times = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=False)  # grads stay allocated, as in a training loop
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        del loss
        times.append(time.perf_counter() - t0)
        peaks.append(maxrss_kib())
    return dict(
        mode=args.mode, depth=args.depth, batch=args.batch, model=args.model,
        model_kwargs={k: v for k, v in kwargs.items()}, n_params=n_params,
        threads=torch.get_num_threads(),
        malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        maxrss_kib_after_import=after_import, maxrss_kib_after_build=after_build,
        maxrss_kib_after_step=peaks, step_seconds=times, peak_kib=peaks[-1],
    )


# --------------------------------------------------------------------------------------------
# parent: orchestration and reports
# --------------------------------------------------------------------------------------------

def _child_argv(args, mode, depth, batch):
    argv = [sys.executable, str(Path(__file__).resolve()), "--child",
            "--model", args.model, "--mode", mode, "--depth", str(depth), "--batch", str(batch),
            "--width", str(args.width), "--heads", str(args.heads),
            "--img-size", str(args.img_size), "--threads", str(args.threads),
            "--steps", str(args.steps), "--depth-kwarg", args.depth_kwarg]
    for item in args.override:
        argv += ["--override", item]
    return argv


def measure(args, mode, depth, batch) -> dict:
    return measure_in_child(_child_argv(args, mode, depth, batch), args.threads,
                            "memory_vs_depth", f"mode={mode} depth={depth} batch={batch}")


def _peak(raw, mode, depth, batch, repeat=None):
    vals = [r["peak_kib"] for r in raw
            if (r["mode"], r["depth"], r["batch"]) == (mode, depth, batch)
            and (repeat is None or r["repeat"] == repeat)]
    return statistics.median(vals)


def per_sample_table(raw, modes, depths, b1, b2):
    """{mode: {depth: per-sample MiB}} from the median peaks over repeats, and the per-sample
    value of each repeat on its own (to show the spread)."""
    table, by_repeat = {}, {}
    repeats = sorted({r["repeat"] for r in raw})
    for mode in modes:
        table[mode], by_repeat[mode] = {}, {}
        for d in depths:
            diff_kib = _peak(raw, mode, d, b2) - _peak(raw, mode, d, b1)
            table[mode][d] = diff_kib / (b2 - b1) / 1024.0
            by_repeat[mode][d] = [
                (_peak(raw, mode, d, b2, k) - _peak(raw, mode, d, b1, k)) / (b2 - b1) / 1024.0
                for k in repeats]
    return table, by_repeat


def _linear_fit(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    icept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (icept + slope * x)) ** 2 for x, y in zip(xs, ys))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return slope, icept, r2


def summarize(table, modes, depths):
    lo, hi = (12, 48) if 12 in depths and 48 in depths else (depths[0], depths[-1])
    summary = dict(growth_from=lo, growth_to=hi, growth_pct={}, linear_fit={})
    for mode in modes:
        a, b = table[mode][lo], table[mode][hi]
        summary["growth_pct"][mode] = (b - a) / a * 100.0 if a > 0 else None
        if len(depths) >= 3:
            slope, icept, r2 = _linear_fit(depths, [table[mode][d] for d in depths])
            summary["linear_fit"][mode] = dict(mib_per_block=slope, intercept_mib=icept, r2=r2)
    return summary


def write_markdown(path, table, summary, modes, depths, info, settings, command):
    heads = f"{settings['heads']} heads" if settings["heads"] else "the variant heads"
    lines = [
        "# Peak training memory per sample vs depth (CPU)",
        "",
        f"Model `{settings['model']}`, width {settings['width'] or 'as the variant'}, "
        f"{heads}, {settings['img_size']}x{settings['img_size']} "
        f"input, batch sizes {settings['batch_sizes'][0]} and {settings['batch_sizes'][1]}, "
        f"{settings['threads']} torch thread(s), {settings['steps']} training step(s) per process "
        f"(forward + cross-entropy + backward; the first is a warm-up), "
        f"{settings['repeats']} repeat(s) (median). Per-sample memory is "
        "(peak RSS at the larger batch - peak RSS at the smaller) / (batch difference), each peak "
        "from its own fresh process with `MALLOC_MMAP_THRESHOLD_=65536`. MiB per sample:",
        "",
    ]
    header = ["depth"] + modes
    if "plain" in modes and "reversible" in modes:
        header.append("plain / reversible")
    if "checkpoint" in modes and "reversible" in modes:
        header.append("checkpoint / reversible")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---:"] * len(header)) + "|")
    for d in depths:
        row = [str(d)] + [f"{table[m][d]:.1f}" for m in modes]
        if "plain / reversible" in header:
            row.append(f"{table['plain'][d] / table['reversible'][d]:.1f}x")
        if "checkpoint / reversible" in header:
            row.append(f"{table['checkpoint'][d] / table['reversible'][d]:.1f}x")
        lines.append("| " + " | ".join(row) + " |")
    lo, hi = summary["growth_from"], summary["growth_to"]
    lines += ["", f"Growth from {lo} to {hi} blocks:", ""]
    for m in modes:
        g = summary["growth_pct"][m]
        fit = summary["linear_fit"].get(m)
        extra = (f" (linear fit: {fit['mib_per_block']:.2f} MiB per block per sample, "
                 f"R² {fit['r2']:.3f})") if fit else ""
        lines.append(f"- {m}: {g:+.1f}%{extra}" if g is not None else f"- {m}: n/a")
    if settings["repeats"] > 1:
        lines += ["", f"Largest spread of a per-sample value across the {settings['repeats']} "
                      f"repeats: {summary['max_repeat_spread_mib']:.2f} MiB."]
    lines += [
        "",
        measured_on(info, command, settings["wall_seconds"], f"{info['mem_total_gib']} GiB",
                    settings["json_name"]) + " Run times depend on the load, memory does not.",
        "",
    ]
    Path(path).write_text("\n".join(lines))


def write_plot(path, table, modes, depths, info, settings):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in modes:
        ax.plot(depths, [table[m][d] for d in depths], marker="o", label=m)
    ax.set_xlabel("depth (blocks)")
    ax.set_ylabel("peak training memory per sample (MiB)")
    ax.set_title(f"{settings['model']}, width {settings['width'] or 'default'}, "
                 f"{settings['img_size']}px, CPU peak RSS", fontsize=10)
    ax.set_xticks(depths)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_parent(args, argv):
    if len(args.batch_sizes) != 2 or args.batch_sizes[0] >= args.batch_sizes[1]:
        sys.exit("memory_vs_depth: --batch-sizes needs two sizes, smaller first")
    for m in args.modes:
        if m not in MODES:
            sys.exit(f"memory_vs_depth: unknown mode {m!r} (choose from {', '.join(MODES)})")
    depths = sorted(set(args.depths))
    b1, b2 = args.batch_sizes
    load_start = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    raw = []
    jobs = [(r, m, d, b) for r in range(args.repeats) for d in depths for m in args.modes
            for b in (b1, b2)]
    for i, (r, m, d, b) in enumerate(jobs):
        res = measure(args, m, d, b)
        res["repeat"] = r
        raw.append(res)
        if not args.quiet:
            print(f"[{i + 1}/{len(jobs)}] {m:10s} depth {d:3d} batch {b:3d}: peak "
                  f"{res['peak_kib'] / 1024:8.1f} MiB  (step {res['step_seconds'][-1]:.2f} s)",
                  flush=True)
    wall = time.perf_counter() - t0
    table, by_repeat = per_sample_table(raw, args.modes, depths, b1, b2)
    summary = summarize(table, args.modes, depths)
    summary["max_repeat_spread_mib"] = max(max(v) - min(v) for m in by_repeat
                                           for v in by_repeat[m].values())
    info = machine_info()
    info["load_average_1min_at_start"] = load_start
    command = command_line(__file__, argv)
    settings = dict(
        model=args.model, width=args.width, heads=args.heads, img_size=args.img_size,
        depths=depths, modes=list(args.modes), batch_sizes=[b1, b2], threads=args.threads,
        steps=args.steps, repeats=args.repeats, overrides=list(args.override),
        depth_kwarg=args.depth_kwarg, env=MALLOC_ENV, wall_seconds=wall,
        json_name=os.path.relpath(args.json, Path(args.markdown).parent),
    )
    out = dict(
        machine=info, settings=settings, command=command,
        per_sample_mib={m: {str(d): v for d, v in table[m].items()} for m in args.modes},
        per_sample_mib_by_repeat={m: {str(d): v for d, v in by_repeat[m].items()}
                                  for m in args.modes},
        summary=summary, raw=raw,
    )
    for p in (args.json, args.markdown, args.plot):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    write_markdown(args.markdown, table, summary, list(args.modes), depths, info, settings,
                   command)
    write_plot(args.plot, table, list(args.modes), depths, info, settings)
    if not args.quiet:
        print(Path(args.markdown).read_text())
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rev_vit_s", help="any revvit_d2.create_model name")
    p.add_argument("--width", type=int, default=192,
                   help="embed_dim override (0: keep the variant's)")
    p.add_argument("--heads", type=int, default=3,
                   help="num_heads override (0: keep the variant's)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8, 12, 24, 48])
    p.add_argument("--modes", nargs="+", default=list(MODES), help=f"subset of {MODES}")
    p.add_argument("--batch-sizes", type=int, nargs=2, default=[2, 6], metavar=("B1", "B2"),
                   help="two batch sizes, smaller first (avoid 1: see the module docstring)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    p.add_argument("--steps", type=int, default=2,
                   help="training steps per child (the first is the warm-up)")
    p.add_argument("--repeats", type=int, default=2,
                   help="fresh processes per (mode, depth, batch); the median peak is used")
    p.add_argument("--depth-kwarg", default="depth", help="create_model keyword for the depth")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra create_model keyword (Python literal), repeatable")
    p.add_argument("--json", default=str(ROOT / "docs" / "results" / "memory_vs_depth.json"))
    p.add_argument("--markdown", default=str(ROOT / "docs" / "results" / "memory_vs_depth.md"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "results" / "memory_vs_depth.png"))
    p.add_argument("--quiet", action="store_true")
    # child-only arguments
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="reversible", help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, default=12, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    return dispatch(argv, parse_args, run_child, run_parent)


if __name__ == "__main__":
    sys.exit(main())
