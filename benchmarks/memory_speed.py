#!/usr/bin/env python
"""Training memory per image, largest batch and images/s: plain ViT vs Rev-ViT vs activation
checkpointing, and Rev-MViT vs the same model with plain autograd, side by side in one run.

On CUDA (the real target) memory is ``torch.cuda.max_memory_allocated``; per-image memory is the
difference between two batch sizes divided by their difference (constant parts cancel), the
largest batch is found by doubling then bisection on out-of-memory, and speed is the median step
time at equal batch. On a CPU only step time is measured (memory: benchmarks/memory_vs_depth.py),
so CPU runs give speed *ratios* only. Every pair is measured interleaved, so machine noise hits
both sides alike.

Both sides use ``scaled_dot_product_attention``: the plain baselines are timm ViTs (fused
attention) and our models with ``use_rev_backprop=False``.

Every run writes ``OUT.json``, ``OUT.md`` and a plot ``OUT.png`` (step time relative to the plain
model per side; with CUDA numbers also memory per image and the largest batch).
``--plot-only OUT.json`` redraws the plot from a saved JSON without measuring anything.

Out of memory and long runs (CUDA): only the models being measured are on the device (a row's
sides together for the interleaved timing, then each side alone for its memory and largest
batch; built on the CPU, moved there right before and back right after). An attempt that runs
out of memory (:func:`is_oom`: ``torch.OutOfMemoryError`` and the allocation failures cuBLAS
and cuDNN report as plain ``RuntimeError``) releases what it held (gradients, the failed step's
tensors, the allocator cache) before the next one. A timing run that runs out of memory (at the
speed batch, or at the largest batch the search found: fragmentation can make it fail once
more) is repeated at a smaller batch, and the batch actually timed is recorded
(``batch``/``batch_requested``, ``batch_at_largest``); a memory measurement that runs out of
memory is recorded as null. ``OUT.json`` and ``OUT.md`` are rewritten (atomically) after
every row, so a killed run keeps every row it finished.

Example (GPU, the acceptance run):

    python benchmarks/memory_speed.py --device cuda --dtypes float32 bfloat16 \
        --out docs/results/memory_speed_gpu
    python benchmarks/memory_speed.py --plot-only docs/results/memory_speed_cpu.json
"""
import argparse
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

import revvit_d2
from revvit_d2.utils.io import atomic_write

# name: (factory of the model, description)
VIT_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}


def build(kind: str, size: str, depth: int, img: int, **extra):
    """kind: 'rev' (Rev-ViT), 'plain' (timm ViT), 'ckpt' (timm ViT + grad checkpointing),
    'rev_parallel' (Rev-ViT, parallel backward), 'rev_hybrid' (Rev-ViT whose last half of the
    blocks keep their activations: ``stored_blocks=depth // 2``), 'revmvit' / 'revmvit_plain'."""
    if kind.startswith("revmvit"):
        return revvit_d2.create_model("rev_mvit_b", use_rev_backprop=(kind == "revmvit"),
                                      drop_path_rate=0.0, **extra)
    dim, default_depth, heads = VIT_SIZES[size]
    depth = depth or default_depth
    if kind in ("rev", "rev_parallel", "rev_hybrid"):
        return revvit_d2.create_model(f"rev_vit_{size}", depth=depth, img_size=img,
                                      drop_path_rate=0.0,
                                      parallel_backward=(kind == "rev_parallel"),
                                      stored_blocks=depth // 2 if kind == "rev_hybrid" else 0,
                                      **extra)
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=dim,
                              depth=depth, num_heads=heads, img_size=img, num_classes=1000,
                              class_token=False, global_pool="avg")
    if kind == "ckpt":
        model.set_grad_checkpointing(True)
    return model


def step(model, x, y, dtype, device):
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Substrings of the messages of allocation failures that CUDA libraries raise as a plain
#: ``RuntimeError`` (cuBLAS and cuDNN allocate their handles and workspaces themselves and do
#: not raise ``torch.OutOfMemoryError``), matched case-insensitively.
OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")


def is_oom(err: BaseException) -> bool:
    """True when `err` says the device ran out of memory: ``torch.cuda.OutOfMemoryError`` (the
    caching allocator) or a ``RuntimeError`` carrying one of :data:`OOM_MESSAGES`."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    if not isinstance(err, RuntimeError):
        return False
    message = str(err).lower()
    return any(m.lower() in message for m in OOM_MESSAGES)


def release(models, device):
    """What a failed attempt leaves behind: the gradients it accumulated, its tensors caught in
    reference cycles, and the blocks the caching allocator keeps (another batch size needs
    other block sizes)."""
    for m in models:
        m.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def attempt(fn, models, device):
    """``(True, fn())``, or ``(False, None)`` when `fn` ran out of memory (:func:`is_oom`); any
    other error propagates. After a failure :func:`release` runs *outside* the handler, once the
    exception, whose traceback holds the failed step's frames (activations, graph), is gone."""
    try:
        return True, fn()
    except RuntimeError as err:
        if not is_oom(err):
            raise
        print(f"out of memory: {str(err).strip().splitlines()[0][:160]}", file=sys.stderr,
              flush=True)
    release(models, device)
    return False, None


def with_fallback(timer, batch, models, device, shrink=0.875, tries=12):
    """``(b, timer(b))`` for the first batch b, from `batch` down, at which `timer` does not run
    out of memory (each retry ``shrink`` times the last, at least one smaller); ``(0, None)``
    if none of `tries` batches does."""
    for _ in range(tries):
        if batch < 1:
            break
        ok, value = attempt(functools.partial(timer, batch), models, device)
        if ok:
            return batch, value
        batch = min(batch - 1, int(batch * shrink))
        if batch >= 1:
            print(f"retrying at batch {batch}", file=sys.stderr, flush=True)
    return 0, None


def peak_bytes(model, batch, img, dtype, device):
    """Peak memory of a training step above what was allocated before it (CUDA). On a CPU the
    same two steps run and 0 is returned (the search logic can then be tested on a CPU)."""
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    step(model, x, y, dtype, device)  # warm-up: lazy allocations, cuDNN/SDPA choices
    sync(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    step(model, x, y, dtype, device)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base if cuda else 0


def fits(model, batch, img, dtype, device) -> bool:
    ok, _ = attempt(lambda: peak_bytes(model, batch, img, dtype, device), [model], device)
    if ok and device.type == "cuda":
        torch.cuda.empty_cache()  # the next probe (twice the batch) needs larger blocks
    return ok


def largest_batch(model, img, dtype, device, limit=65536):
    lo, hi = 0, 1
    while hi <= limit and fits(model, hi, img, dtype, device):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(model, mid, img, dtype, device) else (lo, mid)
    return lo


def step_times(models, batch, img, dtype, device, repeats):
    """Median step time of every model, timed interleaved (:func:`step_samples`)."""
    return {k: statistics.median(v)
            for k, v in step_samples(models, batch, img, dtype, device, repeats).items()}


def step_samples(models, batch, img, dtype, device, repeats):
    """Interleaved timing: each round times one step of every model; all rounds' times."""
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    times = {k: [] for k in models}
    for m in models.values():
        step(m, x, y, dtype, device)
    for _ in range(repeats):
        for k, m in models.items():
            sync(device)
            t = time.perf_counter()
            step(m, x, y, dtype, device)
            sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def machine(device):
    info = dict(python=platform.python_version(), torch=torch.__version__,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                threads=torch.get_num_threads())
    if hasattr(os, "getloadavg"):  # other jobs on the machine (1-minute load at the start)
        info["loadavg_1min"] = round(os.getloadavg()[0], 2)
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if "model name" in ln)
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory
                                       / 2**30, 1)
    return info


def off_device(models, device):
    """Move measured models back to the CPU and free what they left on `device`."""
    for m in models:
        m.to("cpu")
    release(models, device)


def run(args, on_row=None):
    """Measure every row; ``on_row(rows)`` is called after each (the incremental write)."""
    device = torch.device(args.device)
    rows = []

    def add(label, models):
        rows.append(measure(label, models, args, dtype, device))
        if on_row is not None:
            on_row(rows)

    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for size in args.sizes:
            for depth in args.depths or [0]:
                kinds = args.sides or (["plain", "rev", "ckpt"]
                                       + (["rev_parallel"] if args.parallel else [])
                                       + (["rev_hybrid"] if args.hybrid else []))
                torch.manual_seed(0)
                # built on the CPU: measure() moves only the models it measures to the device
                models = {k: build(k, size, depth, args.img_size).train() for k in kinds}
                add(f"vit_{size}" + (f"@{depth}" if depth else ""), models)
                del models
        if args.mvit:
            models = {k: build(k, "b", 0, 224).train() for k in ("revmvit_plain", "revmvit")}
            add("mvit_b", models)
            del models
    return rows


def measure(label, models, args, dtype, device):
    """One row. The sides are timed interleaved, all on the device together (the interleaving
    needs them there); then, on CUDA, each side alone on the device: memory per image, largest
    batch and images/s at it. Models arrive on the CPU and leave on it."""
    row = {"model": label, "dtype": str(dtype).replace("torch.", ""), "batch": args.batch}
    for m in models.values():
        m.to(device)
    timer = functools.partial(step_samples, models, img=args.img_size, dtype=dtype,
                              device=device, repeats=args.repeats)
    batch, samples = with_fallback(timer, args.batch, list(models.values()), device)
    off_device(models.values(), device)
    if samples is None:
        row["error"] = "out of memory at every batch tried"
        print(json.dumps(row), flush=True)
        return row
    if batch != args.batch:
        row["batch"], row["batch_requested"] = batch, args.batch
    row["images_per_s"] = {k: batch / statistics.median(v) for k, v in samples.items()}
    ref = samples[_reference(list(samples))]
    # per round, this side's time over the reference's (same round: same machine load)
    row["median_round_ratio"] = {k: statistics.median(t / r for t, r in zip(v, ref))
                                 for k, v in samples.items()}
    row["step_s"] = samples
    if device.type == "cuda":
        for k, m in models.items():
            measure_side(row, k, m.to(device), args, dtype, device)
            off_device([m], device)
    print(json.dumps(row), flush=True)
    return row


def measure_side(row, key, model, args, dtype, device):
    """Memory per image (null if a memory batch does not fit), and with ``--largest-batch`` the
    largest batch and images/s at it (at a smaller batch if that run runs out of memory:
    ``batch_at_largest``), of one model alone on the device, into `row`."""
    b1, b2 = args.memory_batches
    ok, peaks = attempt(lambda: [peak_bytes(model, b, args.img_size, dtype, device)
                                 for b in (b1, b2)], [model], device)
    row.setdefault("mib_per_image", {})[key] = ((peaks[1] - peaks[0]) / (b2 - b1) / 2**20
                                                if ok else None)
    if not args.largest_batch:
        return
    largest = largest_batch(model, args.img_size, dtype, device)
    row.setdefault("largest_batch", {})[key] = largest
    if not largest:
        return
    timed, seconds = with_fallback(
        lambda b: step_times({key: model}, b, args.img_size, dtype, device, 3)[key],
        largest, [model], device)
    if timed:
        row.setdefault("images_per_s_at_largest", {})[key] = timed / seconds
        row.setdefault("batch_at_largest", {})[key] = timed


def _reference(sides):
    """The side the time ratios refer to: the plain model where measured, else the first."""
    for ref in ("plain", "revmvit_plain"):
        if ref in sides:
            return ref
    return list(sides)[0]


def write(rows, info, args):
    """``OUT.json`` and ``OUT.md`` of the rows so far, each replaced atomically (called after
    every row: a run killed midway leaves whole files with the rows it finished)."""
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_write(args.out + ".json", "w") as f:
        json.dump({"machine": info, "settings": vars(args), "rows": rows}, f, indent=1)
    memory = any("mib_per_image" in r for r in rows)
    lines = [f"# Training memory and speed ({info.get('gpu', info['cpu'])})", "",
             f"`{' '.join(sys.argv)}`; torch {info['torch']}, {info['date']}.", "",
             "| model | dtype | side | images/s @ batch | time ratio to reference | "
             "median of per-round ratios |"
             + (" MiB/image | reference/this (memory) | largest batch |" if memory else ""),
             "|---|---|---|---:|---:|---:|" + ("---:|---:|---:|" if memory else "")]
    for r in rows:
        if "images_per_s" not in r:  # nothing fitted (see "error")
            lines.append(f"| {r['model']} | {r['dtype']} | | {r.get('error', '')} | | |"
                         + (" | | |" if memory else ""))
            continue
        sides = list(r["images_per_s"])
        ref = _reference(sides)
        batch = f"{r['batch']}" + (f" (asked {r['batch_requested']}: out of memory)"
                                   if "batch_requested" in r else "")
        for k in sides:
            t_ratio = r["images_per_s"][ref] / r["images_per_s"][k]
            line = (f"| {r['model']} | {r['dtype']} | {k} | {r['images_per_s'][k]:.1f} "
                    f"@ {batch} | {t_ratio:.3f}x ({ref}) |")
            if "median_round_ratio" in r:
                line += f" {r['median_round_ratio'][k]:.3f}x |"
            else:  # a run saved before this column existed
                line += " |"
            if "mib_per_image" in r:
                mem, ref_mem = r["mib_per_image"].get(k), r["mib_per_image"].get(ref)
                largest = r.get("largest_batch", {}).get(k, "")
                timed = r.get("batch_at_largest", {}).get(k, largest)
                if timed != largest:
                    largest = f"{largest} (timed at {timed or 'none'})"
                line += (f" {'out of memory' if mem is None else f'{mem:.1f}'} |"
                         f" {f'{ref_mem / mem:.2f}x' if mem and ref_mem else ''} |"
                         f" {largest} |")
            elif memory:
                line += " | | |"
            lines.append(line)
    lines += ["", "Time ratio > 1: a step is that many times slower than the reference's (the "
              "plain model where measured, else the first side) at the same batch; the first "
              "ratio is of the median step times, the second the median over the interleaved "
              "rounds of each round's ratio. Memory is per image (difference of two batch sizes)."
              " A batch that ran out of memory was retried smaller; the batch timed is shown.",
              "", f"Plot: [{os.path.basename(args.out)}.png]({os.path.basename(args.out)}.png)."]
    with atomic_write(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(data, path):
    """Grouped bars, one group per (model, dtype) row, one bar per side: step time relative to
    the plain model, then (CUDA runs) MiB per image and the largest batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if "images_per_s" in r]  # not the rows that never fitted
    panels = [("images_per_s", "step time / reference's (lower is faster)")]
    if any("mib_per_image" in r for r in rows):
        panels.append(("mib_per_image", "MiB per image"))
    if any("largest_batch" in r for r in rows):
        panels.append(("largest_batch", "largest batch"))
    sides = list(dict.fromkeys(k for r in rows for k in r["images_per_s"]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 1.3 * len(rows) + 2),
                                                       3.2 * len(panels)), squeeze=False)
    width = 0.8 / max(1, len(sides))
    for ax, (key, label) in zip(axes[:, 0], panels):
        for j, side in enumerate(sides):
            xs, ys = [], []
            for i, r in enumerate(rows):
                if r.get(key, {}).get(side) is None:  # not measured, or out of memory
                    continue
                v = r[key][side]
                if key == "images_per_s":  # time ratio: plain images/s over this side's
                    v = r[key][_reference(r[key])] / v
                xs.append(i + (j - (len(sides) - 1) / 2) * width)
                ys.append(v)
            ax.bar(xs, ys, width, label=side)
        if key == "images_per_s":
            ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel(label)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room for the legend
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{r['model']}\n{r['dtype']}, batch {r['batch']}" for r in rows])
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize="small", ncol=len(sides))
    info = data["machine"]
    fig.suptitle(f"{info.get('gpu', info['cpu'])}, torch {info['torch']}, {info['date'][:10]}",
                 fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", default=["s", "b", "l"], choices=sorted(VIT_SIZES))
    p.add_argument("--depths", nargs="*", type=int, default=[],
                   help="override the depth (e.g. 12 24 48); default: each size's own")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64, help="batch for the speed comparison")
    p.add_argument("--memory-batches", type=int, nargs=2, default=[8, 24])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--largest-batch", action="store_true", help="also search the largest batch")
    p.add_argument("--parallel", action="store_true", help="add the parallel reversible backward")
    p.add_argument("--hybrid", action="store_true",
                   help="add Rev-ViT with stored_blocks = depth // 2 (the memory-budget hybrid)")
    p.add_argument("--sides", nargs="+",
                   choices=["plain", "rev", "ckpt", "rev_parallel", "rev_hybrid"],
                   help="measure only these ViT sides (the first is the reference when "
                        "'plain' is absent), e.g. --sides rev rev_parallel")
    p.add_argument("--mvit", action="store_true", help="add Rev-MViT-B vs plain autograd")
    p.add_argument("--out", default="docs/results/memory_speed")
    p.add_argument("--plot-only", metavar="JSON",
                   help="only redraw the plot of a saved run (written next to it as .png)")
    args = p.parse_args(argv)
    if args.plot_only:
        with open(args.plot_only) as f:
            data = json.load(f)
        png = os.path.splitext(args.plot_only)[0] + ".png"
        plot(data, png)
        print(f"wrote {png}")
        return
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    info = machine(torch.device(args.device))
    rows = run(args, on_row=lambda rows: write(rows, info, args))
    write(rows, info, args)  # also when there was no row
    plot({"machine": info, "rows": rows}, args.out + ".png")
    print(f"wrote {args.out}.md, {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
