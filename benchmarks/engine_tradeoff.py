#!/usr/bin/env python
"""Memory per sample against step time for engine settings, side by side on the CPU.

Three presets:

``--preset overhead`` (step time only): the reversible engine and activation checkpointing
against the same model with plain autograd (``use_rev_backprop=False``), at each ``--widths``;
the FLOP bound of the reversible backward is one extra forward of F and G per block.

``--preset hybrid`` (the memory-budget hybrid, ``stored_blocks=k``): plain autograd, activation
checkpointing, and the reversible engine with k = 0, 2, 4, ... depth stored blocks. Beside the
measured memory, the estimate of :func:`revvit_d2.modeling.estimate_stored_blocks_memory` (what
:func:`~revvit_d2.modeling.choose_stored_blocks` uses) for each k.

``--preset chunks`` (backward micro-chunks, ``rev_backward_chunk=m``): the reversible engine
without and with chunks of ``--chunk`` samples, at a large batch, at each ``--widths``.

Memory: every (setting, batch) runs in a fresh process (``memory_vs_depth.py``'s child: peak
RSS with glibc's mmap threshold pinned, warm-up step first); per-sample memory is the peak
difference between the two ``--batch-sizes`` over their difference. Time: all settings of a
width are built in this process and stepped in turn, ``--rounds`` times, at the larger batch
size (``--time-batch``); each round gives every setting's step time relative to the reference
setting of that round (plain autograd for ``hybrid``, no chunks for ``chunks``), and the median
of those per-round ratios is reported (machine noise hits neighbours alike).

Examples::

    python benchmarks/engine_tradeoff.py --preset hybrid --out docs/results/hybrid_tradeoff_cpu
    python benchmarks/engine_tradeoff.py --preset chunks --widths 384 768 \\
        --out docs/results/backward_chunks_cpu
    python benchmarks/engine_tradeoff.py --preset hybrid --smoke --out /tmp/t   # seconds
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_vs_depth import measure as measure_peak  # noqa: E402
from memory_vs_depth import parse_args as memory_args  # noqa: E402
from peak_rss import ROOT, command_line, machine_info, measured_on  # noqa: E402

HEADS = {64: 2, 192: 3, 384: 6, 768: 12, 1024: 16}
NUM_CLASSES = 10


def settings_of(preset, depth, chunk):
    """[(label, memory_vs_depth mode, overrides)]; the first is the time reference."""
    if preset == "overhead":
        return [("plain", "plain", []), ("reversible", "reversible", []),
                ("checkpoint", "checkpoint", [])]
    if preset == "hybrid":
        ks = sorted(set(range(0, depth + 1, 2)) | {depth})
        return ([("plain", "plain", []), ("checkpoint", "checkpoint", [])]
                + [(f"k={k}", "reversible", [f"stored_blocks={k}"]) for k in ks])
    return [("reversible", "reversible", []),
            (f"chunk={chunk}", "reversible", [f"rev_backward_chunk={chunk}"])]


def _kwargs(mode, overrides, width, depth, img):
    import ast

    kw = dict(embed_dim=width, num_heads=HEADS.get(width, max(1, width // 64)), depth=depth,
              drop_path_rate=0.0, num_classes=NUM_CLASSES,
              use_rev_backprop=mode == "reversible", act_checkpoint=mode == "checkpoint")
    if img != 224:
        kw["img_size"] = img
    for item in overrides:
        key, _, value = item.partition("=")
        kw[key] = ast.literal_eval(value)
    return kw


def memory_per_sample(args, width, mode, overrides):
    margs = memory_args(["--model", "rev_vit_s", "--width", str(width),
                         "--heads", str(HEADS.get(width, max(1, width // 64))),
                         "--img-size", str(args.img_size), "--threads", str(args.threads)]
                        + [a for o in overrides for a in ("--override", o)])
    b1, b2 = args.batch_sizes
    peaks = [measure_peak(margs, mode, args.depth, b)["peak_kib"] for b in (b1, b2)]
    return dict(peak_mib=[p / 1024 for p in peaks], per_sample_mib=(peaks[1] - peaks[0]) / (b2 - b1) / 1024)


def step_time_ratios(args, width, settings):
    """{label: median over rounds of (step time / reference step time)} and raw times."""
    import torch
    import torch.nn.functional as F

    import revvit_d2

    torch.set_num_threads(args.threads)
    models = {}
    for label, mode, overrides in settings:
        torch.manual_seed(0)
        models[label] = revvit_d2.create_model(
            "rev_vit_s", **_kwargs(mode, overrides, width, args.depth, args.img_size)).train()
    x = torch.randn(args.time_batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, NUM_CLASSES, (args.time_batch,))

    def step(model):
        t0, c0 = time.perf_counter(), time.process_time()
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=False)
        return time.perf_counter() - t0, time.process_time() - c0

    for model in models.values():
        step(model)  # warm-up
    times = {label: [] for label in models}
    cpu = {label: [] for label in models}
    for _ in range(args.rounds):
        for label, model in models.items():
            wall, used = step(model)
            times[label].append(wall)
            cpu[label].append(used)
    ref = settings[0][0]
    ratios = {label: statistics.median(t / r for t, r in zip(times[label], times[ref]))
              for label in models}
    cpu_ratios = {label: statistics.median(t / r for t, r in zip(cpu[label], cpu[ref]))
                  for label in models}
    return ratios, cpu_ratios, times


def estimates(args, width):
    import revvit_d2
    from revvit_d2.modeling import estimate_stored_blocks_memory

    model = revvit_d2.create_model("rev_vit_s", **_kwargs("reversible", [], width, args.depth,
                                                          args.img_size))
    peaks = estimate_stored_blocks_memory(model, (3, args.img_size, args.img_size))
    return {f"k={k}": b / 2**20 for k, b in enumerate(peaks)}


def run(args, argv):
    load_start = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    # Memory first, while this process is small: Linux keeps a process's peak RSS across
    # execve, so a child started after this process held models would report this process's
    # peak instead of its own.
    if args.preset != "overhead" and "torch" in sys.modules:
        raise RuntimeError("engine_tradeoff: memory children must start before torch is imported")
    memory = {}
    for width in args.widths:
        for label, mode, overrides in settings_of(args.preset, args.depth, args.chunk):
            memory[width, label] = (
                memory_per_sample(args, width, mode, overrides) if args.preset != "overhead"
                else dict(per_sample_mib=None, peak_mib=[]))
            if not args.quiet and memory[width, label]["per_sample_mib"] is not None:
                print(f"width {width} {label:12s} "
                      f"{memory[width, label]['per_sample_mib']:7.2f} MiB/sample", flush=True)
    rows = []
    for width in args.widths:
        settings = settings_of(args.preset, args.depth, args.chunk)
        ratios, cpu_ratios, times = step_time_ratios(args, width, settings)
        est = estimates(args, width) if args.preset == "hybrid" else {}
        for label, mode, overrides in settings:
            mem = memory[width, label]
            rows.append(dict(width=width, setting=label, mode=mode, overrides=overrides,
                             per_sample_mib=mem["per_sample_mib"], peak_mib=mem["peak_mib"],
                             step_time_ratio=ratios[label], cpu_time_ratio=cpu_ratios[label],
                             median_step_s=statistics.median(times[label]),
                             step_s=times[label], estimate_mib=est.get(label)))
            if not args.quiet:
                r = rows[-1]
                print(f"width {width} {label:12s} time x{r['step_time_ratio']:.3f} "
                      f"(CPU time x{r['cpu_time_ratio']:.3f})", flush=True)
    info = machine_info()
    info["load_average_1min_at_start"] = load_start
    info["threads"] = args.threads
    out = dict(machine=info, command=command_line(__file__, argv), preset=args.preset,
               settings=dict(depth=args.depth, img_size=args.img_size,
                             batch_sizes=list(args.batch_sizes), time_batch=args.time_batch,
                             rounds=args.rounds, chunk=args.chunk, widths=list(args.widths),
                             wall_seconds=time.perf_counter() - t0),
               rows=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(out))
    plot(out, args.out + ".png")
    if not args.quiet:
        print(Path(args.out + ".md").read_text())
    return 0


TITLES = {
    "overhead": "Reversible backward overhead: step time vs plain autograd (CPU)",
    "hybrid": "Memory-budget hybrid (stored_blocks=k): memory per sample vs step time (CPU)",
    "chunks": "Backward micro-chunks (rev_backward_chunk): memory per sample vs step time (CPU)",
}


def markdown(out):
    s, m, preset = out["settings"], out["machine"], out["preset"]
    ref = "the reversible engine without chunks" if preset == "chunks" else (
        "plain autograd (the same model, `use_rev_backprop=False`)")
    memory = "" if preset == "overhead" else (
        f"Memory per sample: (peak RSS at batch {s['batch_sizes'][1]} - at batch "
        f"{s['batch_sizes'][0]}) / {s['batch_sizes'][1] - s['batch_sizes'][0]}, one fresh "
        f"process per peak. ")
    lines = [f"# {TITLES[preset]}", "",
             f"Rev-ViT, depth {s['depth']}, {s['img_size']}x{s['img_size']}, fp32. {memory}Step "
             f"time: median over {s['rounds']} interleaved rounds of the per-round ratio to "
             f"{ref}, batch {s['time_batch']}; wall clock, and beside it the process CPU time "
             f"(less sensitive to other jobs on the machine).", ""]
    head = ["width", "setting"] + ([] if preset == "overhead" else ["MiB per sample"]) + [
        "step time ratio", "CPU time ratio", "median step (s)"] + (
        ["estimated MiB per sample"] if preset == "hybrid" else []) + (
        [] if preset == "overhead" else ["peak MiB (small / large batch)"])
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in out["rows"]:
        cells = [str(r["width"]), r["setting"]]
        if preset != "overhead":
            cells.append(f"{r['per_sample_mib']:.2f}")
        cells += [f"{r['step_time_ratio']:.3f}x", f"{r['cpu_time_ratio']:.3f}x",
                  f"{r['median_step_s']:.2f}"]
        if preset == "hybrid":
            cells.append(f"{r['estimate_mib']:.2f}" if r["estimate_mib"] is not None else "")
        if preset != "overhead":
            cells.append(" / ".join(f"{p:.0f}" for p in r["peak_mib"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", measured_on(m, out["command"], s["wall_seconds"], f"{m['threads']} torch threads"),
              ""]
    return "\n".join(lines)


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if out["preset"] == "overhead":
        for width in out["settings"]["widths"]:
            rows = [r for r in out["rows"] if r["width"] == width]
            ax.bar([f"{r['setting']}\n{width}" for r in rows],
                   [r["step_time_ratio"] for r in rows])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("step time / plain autograd")
        ax.set_title(f"Rev-ViT depth {out['settings']['depth']}, CPU", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    for width in out["settings"]["widths"]:
        rows = [r for r in out["rows"] if r["width"] == width]
        ax.plot([r["per_sample_mib"] for r in rows], [r["step_time_ratio"] for r in rows],
                "o", label=f"width {width}")
        for r in rows:
            ax.annotate(r["setting"], (r["per_sample_mib"], r["step_time_ratio"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("training memory per sample (MiB, CPU peak RSS)")
    ax.set_ylabel("step time / reference")
    ax.set_title(f"{out['preset']}: Rev-ViT depth {out['settings']['depth']}, CPU", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("overhead", "hybrid", "chunks"), required=True)
    p.add_argument("--widths", type=int, nargs="+", default=[384])
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-sizes", type=int, nargs=2, default=None, metavar=("B1", "B2"),
                   help="memory batch sizes (default 2 6 for hybrid, 16 32 for chunks)")
    p.add_argument("--time-batch", type=int, default=None, help="default: the larger B2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (width 64, depth 4, 64x64, 2 rounds): checks the script")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "engine_tradeoff_cpu"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.widths, args.depth, args.img_size, args.rounds = [64], 4, 64, 2
        args.batch_sizes = args.batch_sizes or [2, 4]
        args.chunk = min(args.chunk, 2)
    if args.batch_sizes is None:
        args.batch_sizes = [16, 32] if args.preset == "chunks" else [2, 6]
    args.time_batch = args.time_batch or args.batch_sizes[1]
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return run(parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
