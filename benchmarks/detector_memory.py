#!/usr/bin/env python
"""Training memory per image of the Rev-ViT-B Mask R-CNN against the plain ViT-B one, same recipe.

The models are the COCO LazyConfigs themselves, built with ``LazyConfig.load`` + ``instantiate``
as tools/train_net.py builds them (train mode, random init):

    revvit_b           configs/COCO/mask_rcnn_revvit_b_100ep.py (reversible backward)
    revvit_b_autograd  the same model with ``use_rev_backprop=False``: isolates what the
                       reversible backward saves from everything else
    vit_b              configs/COCO/mask_rcnn_vit_b_100ep.py (detectron2's ViT, same recipe)

Each takes one training step on synthetic detectron2 inputs (``image`` CHW floats in 0..255,
``instances`` with ``gt_boxes``, ``gt_classes`` and ``BitMasks`` ``gt_masks``, a few boxes per
image; image i is the same at every batch size), measured two ways ("parts"):

    backbone  the ViT trunk alone (``model.backbone.net``) on the preprocessed, padded images,
              loss = mean of its output: the part that is reversible
    detector  the whole Mask R-CNN training loss (pyramid, RPN, box and mask heads), backward
              included; detector - backbone = what the non-reversible rest costs

Per-image memory is (peak(b2) - peak(b1)) / (b2 - b1), each peak from its own fresh process, so
weights, gradients, libraries and fixed buffers cancel. On a CPU the peak is the child's peak RSS
with ``MALLOC_MMAP_THRESHOLD_=65536`` and a warm-up step (the method and its reasons:
memory_vs_depth.py, whose helpers in peak_rss.py this script uses); on CUDA it is
``torch.cuda.max_memory_allocated`` over the step after the warm-up, and the GPU is named in the
output. Processes run in turn, variants interleaved, so no variant's memory leaks into another's.

The recipe trains at 1024x1024 (``square_pad=1024``). ``--img-size`` sets the padded square
(``model.backbone.square_pad``) and the synthetic image size together, so a smaller size on a
CPU is the same model at a smaller input, stated in the output.

Examples::

    python benchmarks/detector_memory.py          # the CPU run in docs/results/detector_memory.*
    python benchmarks/detector_memory.py --device cuda --img-size 1024 \\
        --dtypes float32 float16 bfloat16 --out docs/results/detector_memory_gpu
"""
import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from peak_rss import (MALLOC_ENV, ROOT, command_line, dispatch, machine_info, maxrss_kib,
                      measure_in_child, measured_on)

# name: (config, extra overrides, description)
VARIANTS = {
    "revvit_b": ("configs/COCO/mask_rcnn_revvit_b_100ep.py", [],
                 "Rev-ViT-B, reversible backward"),
    "revvit_b_autograd": ("configs/COCO/mask_rcnn_revvit_b_100ep.py",
                          ["model.backbone.net.use_rev_backprop=False"],
                          "the same Rev-ViT-B, plain autograd"),
    "vit_b": ("configs/COCO/mask_rcnn_vit_b_100ep.py", [], "detectron2 ViT-B (ViTDet)"),
}
PARTS = ("backbone", "detector")
BOXES_PER_IMAGE = 3


# --------------------------------------------------------------------------------------------
# child: one measurement
# --------------------------------------------------------------------------------------------

def build_model(variant: str, img_size: int, overrides=()):
    from detectron2.config import LazyConfig, instantiate

    config, extra, _ = VARIANTS[variant]
    cfg = LazyConfig.load(str(ROOT / config))
    cfg = LazyConfig.apply_overrides(
        cfg, [f"model.backbone.square_pad={img_size}", *extra, *overrides])
    return instantiate(cfg.model)


def synthetic_inputs(batch: int, img_size: int, num_classes: int):
    """detectron2 training inputs; image i depends on i only, not on the batch size."""
    import torch
    from detectron2.structures import BitMasks, Boxes, Instances

    s, n = img_size, BOXES_PER_IMAGE
    inputs = []
    for i in range(batch):
        g = torch.Generator().manual_seed(i)
        image = torch.rand(3, s, s, generator=g) * 255.0
        xy = torch.rand(n, 2, generator=g) * (s / 2)
        wh = (0.1 + 0.4 * torch.rand(n, 2, generator=g)) * s
        boxes = torch.cat([xy, (xy + wh).clamp(max=s)], dim=1).round()
        masks = torch.zeros(n, s, s, dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[k, y0:y1, x0:x1] = True
        inst = Instances((s, s), gt_boxes=Boxes(boxes),
                         gt_classes=torch.randint(0, num_classes, (n,), generator=g),
                         gt_masks=BitMasks(masks))
        inputs.append({"image": image, "instances": inst})
    return inputs


def training_loss(model, inputs, part: str):
    if part == "detector":
        return sum(model(inputs).values())
    images = model.preprocess_image(inputs)  # normalized, padded to the square as in training
    feats = model.backbone.net(images.tensor)
    return sum(f.float().mean() for f in feats.values())


def run_child(args) -> dict:
    import torch
    from detectron2.utils.events import EventStorage

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    after_import = maxrss_kib()
    torch.manual_seed(0)
    model = build_model(args.variant, args.img_size, args.override).to(device).train()
    inputs = synthetic_inputs(args.batch, args.img_size, model.roi_heads.num_classes)
    after_build = maxrss_kib()

    peaks, times = [], []
    storage = EventStorage()  # the ROI heads log training statistics into it
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=False)  # grads stay allocated, as in a training loop
        with storage, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = training_loss(model, inputs, args.part)
        loss.backward()
        del loss
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
        else:
            peaks.append(maxrss_kib() / 1024.0)
        times.append(time.perf_counter() - t0)
    out = dict(
        variant=args.variant, part=args.part, batch=args.batch, dtype=args.dtype,
        device=device.type, img_size=args.img_size, overrides=list(args.override),
        n_params=sum(p.numel() for p in model.parameters()),
        n_params_backbone=sum(p.numel() for p in model.backbone.net.parameters()),
        threads=torch.get_num_threads(),
        malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        maxrss_mib_after_import=after_import / 1024.0,
        maxrss_mib_after_build=after_build / 1024.0,
        peak_mib_after_step=peaks, step_seconds=times,
        # CPU: ru_maxrss is a high-water mark, so the last value is the max over all steps;
        # CUDA: the peak was reset before each step, so this is the step after the warm-up.
        peak_mib=peaks[-1],
    )
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


# --------------------------------------------------------------------------------------------
# parent: orchestration and reports
# --------------------------------------------------------------------------------------------

def _child_argv(args, variant, part, batch, dtype):
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--variant", variant,
            "--part", part, "--batch", str(batch), "--dtype", dtype, "--device", args.device,
            "--img-size", str(args.img_size), "--threads", str(args.threads),
            "--steps", str(args.steps)]
    for item in args.override:
        argv += ["--override", item]
    return argv


def measure(args, job) -> dict:
    repeat, dtype, batch, part, variant = job
    res = measure_in_child(_child_argv(args, variant, part, batch, dtype), args.threads,
                           "detector_memory",
                           f"variant={variant} part={part} batch={batch} dtype={dtype}")
    res["repeat"] = repeat
    return res


def per_image_table(raw, dtypes, parts, variants, b1, b2):
    """{dtype: {part: {variant: MiB per image}}} from the median peak over repeats, plus
    "heads" (detector - backbone: pyramid, RPN, ROI heads) when both parts were measured."""
    def peak(dtype, part, variant, batch):
        return statistics.median(r["peak_mib"] for r in raw
                                 if (r["dtype"], r["part"], r["variant"], r["batch"])
                                 == (dtype, part, variant, batch))

    table = {}
    for dt in dtypes:
        table[dt] = {p: {v: (peak(dt, p, v, b2) - peak(dt, p, v, b1)) / (b2 - b1)
                         for v in variants} for p in parts}
        if "backbone" in parts and "detector" in parts:
            table[dt]["heads"] = {v: table[dt]["detector"][v] - table[dt]["backbone"][v]
                                  for v in variants}
    return table


def ratios(table):
    """{dtype: {part: {"<baseline>/revvit_b": ratio}}} for every baseline that was measured."""
    out = {}
    for dt, parts in table.items():
        out[dt] = {}
        for part, vals in parts.items():
            if "revvit_b" not in vals or vals["revvit_b"] <= 0:
                continue
            out[dt][part] = {f"{v}/revvit_b": vals[v] / vals["revvit_b"]
                             for v in vals if v != "revvit_b"}
    return out


PART_LABELS = {
    "backbone": "backbone (ViT trunk)",
    "detector": "whole detector",
    "heads": "pyramid + RPN + ROI heads (difference)",
}


def write_markdown(path, table, ratio, info, settings, command):
    variants, b1, b2 = settings["variants"], *settings["batch_sizes"]
    gpu = settings["device"] == "cuda"
    where = f"GPU {info['gpu']}" if gpu else "CPU"
    method = ("`torch.cuda.max_memory_allocated` over the step after a warm-up step" if gpu else
              f"peak RSS of a fresh process per measurement with "
              f"`MALLOC_MMAP_THRESHOLD_={MALLOC_ENV['MALLOC_MMAP_THRESHOLD_']}`, "
              f"{settings['steps']} training steps (the first a warm-up), "
              f"{settings['threads']} torch thread(s)")
    size = settings["img_size"]
    size_note = ("the recipe's size" if size == 1024 else
                 f"the recipe trains at 1024x1024; `square_pad` was set to {size} for this run")
    lines = [
        f"# Detector training memory per image: Rev-ViT-B vs ViT-B Mask R-CNN ({where})",
        "",
        f"The COCO configs `{VARIANTS['revvit_b'][0]}` and `{VARIANTS['vit_b'][0]}` (same "
        f"ViTDet recipe), built with LazyConfig + instantiate, train mode, random init. Input "
        f"{size}x{size} ({size_note}), {BOXES_PER_IMAGE} boxes with bitmask masks per image, "
        f"one training step (forward + backward). Memory per image = (peak at batch {b2} - peak "
        f"at batch {b1}) / {b2 - b1}, each peak from {method}; median of "
        f"{settings['repeats']} repeat(s). MiB per image:",
        "",
    ]
    header = ["dtype", "part"] + [f"`{v}`" for v in variants]
    ratio_keys = [f"{v}/revvit_b" for v in variants if v != "revvit_b"] \
        if "revvit_b" in variants else []
    header += [k.replace("/", " / ") for k in ratio_keys]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|---|" + "---:|" * (len(header) - 2))
    for dt, parts in table.items():
        for part, vals in parts.items():
            row = [dt, PART_LABELS[part]] + [f"{vals[v]:.1f}" for v in variants]
            row += [f"{ratio[dt][part][k]:.2f}x" if part in ratio[dt] else "n/a"
                    for k in ratio_keys]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Variants: " + "; ".join(f"`{v}` = {VARIANTS[v][2]}" for v in variants) + "."]
    notes = [
        "* Only the trunk is reversible. The pyramid, RPN and the box and mask heads keep their "
        "activations as usual, so the whole-detector ratio is smaller than the backbone ratio.",
    ]
    if "vit_b" in variants:
        notes.append(
            "* detectron2's ViT attention computes `softmax(q k^T)` explicitly and keeps the "
            "(tokens x tokens) attention map of every head for the backward (large in the four "
            "global blocks), while Rev-ViT calls `scaled_dot_product_attention`: `vit_b / "
            "revvit_b` is what replacing the detector's ViT-B by this Rev-ViT-B saves, attention "
            "kernel included.")
    if "revvit_b_autograd" in variants:
        notes.append("* `revvit_b_autograd / revvit_b` is what the reversible backward alone "
                     "saves (same model, same attention kernel).")
    notes.append("* Rev-ViT's output has 2 x 768 channels (the two streams concatenated), ViT's "
                 "768, so the first pyramid convolutions differ slightly between the detectors.")
    if size != 1024:
        notes.append(
            f"* {size}x{size} rather than 1024x1024 keeps the run within the time and memory of "
            "a small machine. The trunk's activations grow with the number of tokens, and the "
            "attention maps detectron2's ViT keeps grow with its square, so the backbone ratios "
            "at 1024 are expected to be larger than here: measure them with the command below.")
    lines += ["", "Reading the table:", ""] + notes
    lines += [
        "",
        measured_on(info, command, settings["wall_seconds"], f"{info['mem_total_gib']} GiB",
                    settings["json_name"], f"{info['cpu']}, GPU {info['gpu']}" if gpu else "")
        + " Run times depend on the load, memory does not.",
        "",
        "On a GPU (the recipe's size and AMP precision):",
        "",
        "```bash",
        "python benchmarks/detector_memory.py --device cuda --img-size 1024 \\",
        "    --dtypes float32 float16 bfloat16 --out docs/results/detector_memory_gpu",
        "```",
        "",
    ]
    Path(path).write_text("\n".join(lines))


def run_parent(args, argv):
    b1, b2 = args.batch_sizes
    if b1 >= b2:
        sys.exit("detector_memory: --batch-sizes needs two sizes, smaller first")
    out = args.out or str(ROOT / "docs" / "results" / (
        "detector_memory_gpu" if args.device == "cuda" else "detector_memory"))
    load_start = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    # Variants innermost: neighbouring processes measure different models under the same
    # machine conditions.
    jobs = [(r, dt, b, p, v) for r in range(args.repeats) for dt in args.dtypes
            for b in (b1, b2) for p in args.parts for v in args.variants]
    raw = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for i, res in enumerate(pool.map(lambda job: measure(args, job), jobs)):
            raw.append(res)
            if not args.quiet:
                print(f"[{i + 1}/{len(jobs)}] {res['dtype']:8s} {res['part']:8s} "
                      f"{res['variant']:17s} batch {res['batch']}: peak {res['peak_mib']:8.1f} MiB"
                      f"  (step {res['step_seconds'][-1]:.1f} s)", flush=True)
    wall = time.perf_counter() - t0
    table = per_image_table(raw, args.dtypes, args.parts, args.variants, b1, b2)
    ratio = ratios(table)
    info = machine_info()
    info["load_average_1min_at_start"] = load_start
    if args.device == "cuda":
        info["gpu"] = raw[0]["gpu"]
    settings = dict(
        device=args.device, img_size=args.img_size,
        variants=list(args.variants), configs={v: VARIANTS[v][0] for v in args.variants},
        variant_overrides={v: VARIANTS[v][1] for v in args.variants}, parts=list(args.parts),
        dtypes=list(args.dtypes), batch_sizes=[b1, b2], boxes_per_image=BOXES_PER_IMAGE,
        threads=args.threads, steps=args.steps, repeats=args.repeats, jobs=args.jobs,
        overrides=list(args.override), env=MALLOC_ENV if args.device == "cpu" else {},
        wall_seconds=wall, json_name=Path(out + ".json").name,
    )
    command = command_line(__file__, argv)
    result = dict(machine=info, settings=settings, command=command, mib_per_image=table,
                  ratio_to_revvit_b=ratio, raw=raw)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(out + ".md", table, ratio, info, settings, command)
    if not args.quiet:
        print(Path(out + ".md").read_text())
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--img-size", type=int, default=512,
                   help="padded square input (the recipe: 1024; the CPU default: 512)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--dtypes", nargs="+", default=["float32"],
                   choices=["float32", "bfloat16", "float16"],
                   help="float32, or autocast to bfloat16 / float16 (the recipe's AMP on CUDA)")
    p.add_argument("--batch-sizes", type=int, nargs=2, default=[2, 4], metavar=("B1", "B2"),
                   help="two batch sizes, smaller first (1 is a poor first size on the CPU: "
                        "see memory_vs_depth.py)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    p.add_argument("--steps", type=int, default=2,
                   help="training steps per child (the first is the warm-up)")
    p.add_argument("--repeats", type=int, default=1,
                   help="fresh processes per measurement; the median peak is used")
    p.add_argument("--jobs", type=int, default=1,
                   help="children at a time (peaks are per process; >1 only shortens the run)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="LazyConfig override applied to every variant, repeatable")
    p.add_argument("--out", default="",
                   help="output prefix for .json and .md (default docs/results/detector_memory, "
                        "docs/results/detector_memory_gpu on CUDA)")
    p.add_argument("--quiet", action="store_true")
    # child-only arguments
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="revvit_b", help=argparse.SUPPRESS)
    p.add_argument("--part", default="detector", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    return dispatch(argv, parse_args, run_child, run_parent)


if __name__ == "__main__":
    sys.exit(main())
