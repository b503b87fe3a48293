#!/usr/bin/env python
"""Simulated training memory per image: ViT-B/L/H and the ViT-B detectors, no GPU needed.

Every number this script writes is *simulated*: the model is built under PyTorch's
``FakeTensorMode`` (tensors carry shapes, dtypes and storages but no data, so nothing is
allocated and no arithmetic runs) and one training step runs under PyTorch's own memory tracker,
``torch.distributed._tools.mem_tracker.MemTracker``. The tracker is a ``TorchDispatchMode``: it
sees every tensor every aten op creates, in the forward, in the backward (the reversible
engine's backward included: it is an autograd Function whose backward recomputes F and G with
``torch.autograd.grad``, and those ops reach the tracker like any other) and in the optimizer
step; it drops a tensor when its storage is freed, and keeps the peak of the live total with its
split into parameters, gradients, optimizer state, activations, temporaries (gradients of
activations and the like) and "other" (the input batch). No hand count is involved.

One simulated step, at batch size b:

1. warm-up, not tracked: forward, loss, backward, AdamW step, ``zero_grad(set_to_none=False)``,
   so gradients and the optimizer's two moments exist, as in the middle of training;
2. forward + loss + backward under one tracker: its peak is the training peak;
3. the AdamW step under another tracker: its peak (moments + the step's temporaries).

Per image = (peak(b2) - peak(b1)) / (b2 - b1): everything that does not grow with the batch
cancels. The constant part (parameters + gradients + AdamW state) is reported on its own, and
so is the fixed working memory the straight line through the two peaks leaves at batch 0
beyond it (the reversible backward's parameter gradients, for instance, exist as temporaries
until autograd adds them into ``.grad``: one more copy of the blocks' gradients while ``.grad``
is kept allocated, none with ``zero_grad(set_to_none=True)``, where autograd takes them over).

The ViT rows use large batches (32 and 64 by default; fake tensors make them free). The peak
is the larger of two candidates, the end of the forward (everything saved) and the reversible
backward (its working set plus fixed-size gradients); with the hybrid (``stored_blocks``) the
first grows faster with the batch but starts lower, and at small batches the second wins at
both batch sizes, so the difference would miss the stored blocks. At large batches the
per-image figure is the one that decides the largest batch that fits.

What the simulation does not model: allocator caching and fragmentation (a GPU's
``max_memory_reserved`` exceeds the tensor peak, and the CUDA allocator rounds each block up to
512 bytes), cuBLAS/cuDNN workspaces, the CUDA context. The simulation runs on the CPU device,
where ``scaled_dot_product_attention`` picks the fused (flash) CPU kernel, which like a GPU's
fused kernels saves the output and the log-sum-exp rather than the attention matrix (a fake
*CUDA* tensor would take the math path, which keeps the matrix: wrong for a real GPU, so
``--device cuda`` is refused without one). The detectors' RPN and ROI heads are not simulated:
detectron2 reads image sizes and selects boxes from tensor values (``ImageList.from_tensors``,
anchor matching, NMS), which fake tensors do not have; the trunk and the trunk + pyramid are.

Validation (unless ``--no-validate``): the same simulation for the configurations of the
committed CPU peak-RSS measurements (``VALIDATION_SOURCES``: width 192, depths 4 to 48; Rev-ViT-B
at 12 blocks; the detector trunks at 512x512; their batches, fp32, no optimizer, as measured),
with the ratio per configuration.

Examples::

    python benchmarks/memory_model.py                  # docs/results/memory_model.{json,md}
    python benchmarks/memory_model.py --smoke --out /tmp/mm      # tiny sizes, under a minute
    # in parts (e.g. on two cores), then merged without recomputing:
    python benchmarks/memory_model.py --sizes vit_h --no-detectors --no-validate --out /tmp/h
    python benchmarks/memory_model.py --sizes vit_b vit_l --out /tmp/bl
    python benchmarks/memory_model.py --sizes --no-detectors --no-validate \
        --merge /tmp/bl.json /tmp/h.json
"""
import argparse
import contextlib
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import revvit_d2  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import detector_memory  # noqa: E402  (its detector configs; detectron2 loads when one is built)

MIB = 2.0 ** 20
# The kinds of memory the tracker tells apart (its _MemRefType values).
CONSTANT_KINDS = ("Parameter", "Buffer", "Gradient", "Optstate")
KINDS = CONSTANT_KINDS + ("Activation", "Temp", "Other")

MODES = {
    "plain": dict(use_rev_backprop=False),
    "checkpoint": dict(use_rev_backprop=False, act_checkpoint=True),
    "reversible": dict(use_rev_backprop=True),
}
# ViT sizes: (variant, overrides). ViT-H is ViT-H/16 here (patch 16, 196 tokens), as the other
# sizes, so that only width and depth change along the table.
SIZES = {
    "vit_b": ("rev_vit_b", {}),
    "vit_l": ("rev_vit_l", {}),
    "vit_h": ("rev_vit_l", dict(embed_dim=1280, depth=32, num_heads=16)),
}
SMOKE_SIZES = {"vit_tiny": ("rev_vit_test", dict(img_size=224, depth=4))}
SMOKE_DETECTOR = dict(parts=("trunk",), overrides=(
    "model.backbone.net.depth=2", "model.backbone.net.embed_dim=64",
    "model.backbone.net.num_heads=2"))
PAPER = {  # training memory per image, MB as printed in the paper (Table 1), fp32, 224x224
    "vit_b": dict(plain=129.7, reversible=17.0),
    "vit_l": dict(plain=349.3, reversible=22.6),
}
DTYPES = {"float32": None, "bfloat16": torch.bfloat16}
DTYPES_ORDER = {d: i for i, d in enumerate(DTYPES)}


# --------------------------------------------------------------------------------------------
# the simulation
# --------------------------------------------------------------------------------------------

def fake_model(build, fake_mode: FakeTensorMode, device: str = "cpu") -> nn.Module:
    """``build()`` on the meta device (constructors may call ``.tolist()``, which a fake tensor
    cannot answer), then every parameter and buffer replaced by an empty fake tensor on
    ``device`` of the same shape, dtype and ``requires_grad``. Weights do not matter to memory.
    A constructor that reads a value even from a meta tensor (detectron2's ViT:
    ``linspace(...)[i].item()``) is built on the CPU instead, real for a moment."""
    try:
        with torch.device("meta"):
            model = build()
    except RuntimeError:
        model = build()
    with fake_mode, torch.device(device):
        for m in model.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                       requires_grad=p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    return model.train()


def _mib(snapshot) -> dict:
    """A tracker snapshot ({device: {kind: bytes}}) as {kind: MiB, "Total": MiB}, one device."""
    out = {k: 0.0 for k in KINDS + ("Total",)}
    for dev_snap in snapshot.values():
        for k, v in dev_snap.items():
            out[str(getattr(k, "value", k))] += v / MIB
    return out


def _tracked_peak(run, *external) -> dict:
    tracker = MemTracker()
    tracker.track_external(*external)
    with tracker:
        run()
    return _mib(tracker.get_tracker_snapshot("peak"))


def simulate_step(build, make_inputs, loss_fn, batch: int, dtype: str = "float32",
                  optimizer: bool = True, fake: bool = True, device: str = "cpu") -> dict:
    """Peak memory (MiB by kind) of one simulated training step at ``batch``.

    Args:
        build: () -> nn.Module, called on the meta device.
        make_inputs: batch -> tuple of tensors, called under the fake mode.
        loss_fn: (model, *inputs) -> scalar loss.
        dtype: "float32", or "bfloat16" for bf16 autocast (weights and optimizer in fp32).
        optimizer: include AdamW (its state in the constant part, its step tracked on its own).
        fake: False runs the same step on real tensors (weights from the constructor), still
            counted by the tracker: what the tests compare the simulation with.
        device: "cpu", or "cuda" on a machine with a GPU (the fake CUDA tensors then take the
            GPU's kernel choices; without a GPU, attention would take the math path).

    Returns {"step": peak of forward + backward, "optimizer_step": peak of the AdamW step or
    None}; each {kind: MiB}. With the optimizer the warm-up step leaves gradients and AdamW
    state allocated, so "step" holds them; without it only the gradients.
    """
    fake_mode = FakeTensorMode() if fake else contextlib.nullcontext()
    model = fake_model(build, fake_mode, device) if fake else build().to(device).train()
    autocast = DTYPES[dtype]
    with fake_mode, torch.device(device):
        inputs = make_inputs(batch)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if optimizer else None

        def forward_backward():
            with torch.autocast(torch.device(device).type, dtype=autocast,
                                enabled=autocast is not None):
                loss = loss_fn(model, *inputs)
            loss.backward()

        forward_backward()  # warm-up: gradients (and optimizer state) now exist
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=False)
        step = _tracked_peak(forward_backward, model, opt, *inputs)
        opt_step = _tracked_peak(opt.step, model, opt) if opt is not None else None
    return dict(step=step, optimizer_step=opt_step)


def per_image(build, make_inputs, loss_fn, batches, dtype="float32", optimizer=True,
              fake=True, device="cpu") -> dict:
    """Per-image memory from two simulated batch sizes, the constant part, and the raw peaks."""
    b1, b2 = batches
    lo = simulate_step(build, make_inputs, loss_fn, b1, dtype, optimizer, fake, device)
    hi = simulate_step(build, make_inputs, loss_fn, b2, dtype, optimizer, fake, device)
    slope = {k: (hi["step"][k] - lo["step"][k]) / (b2 - b1) for k in KINDS + ("Total",)}
    constant = {k: lo["step"][k] for k in CONSTANT_KINDS}
    out = dict(
        mib_per_image=slope["Total"],
        mib_per_image_by_kind={k: slope[k] for k in ("Activation", "Temp", "Other")},
        constant_mib=sum(constant.values()), constant_by_kind_mib=constant,
        # what the straight line through the two peaks adds at batch 0 beyond the constant
        # part: fixed-size working memory (e.g. gradients held before they reach .grad)
        fixed_mib=lo["step"]["Total"] - b1 * slope["Total"] - sum(constant.values()),
        peaks_mib={str(b1): lo, str(b2): hi},
    )
    if optimizer:
        out["optimizer_step_peak_mib"] = lo["optimizer_step"]["Total"]
    return out


# --------------------------------------------------------------------------------------------
# the models
# --------------------------------------------------------------------------------------------

def vit_builder(variant: str, overrides: dict, mode: str, num_classes: int = 1000, **extra):
    kwargs = dict(overrides, num_classes=num_classes, drop_path_rate=0.0, **MODES[mode])
    kwargs.update(extra)
    return lambda: revvit_d2.create_model(variant, **kwargs)


def classification_inputs(img_size: int, num_classes: int):
    def make(batch):
        return (torch.randn(batch, 3, img_size, img_size),
                torch.randint(0, num_classes, (batch,)))
    return make


def classification_loss(model, x, target):
    return nn.functional.cross_entropy(model(x), target)


class Preprocessed(nn.Module):
    """A detector's backbone (or trunk) behind the detector's input normalisation, as
    ``GeneralizedRCNN.preprocess_image`` feeds it: ``(image - pixel_mean) / pixel_std``.
    detectron2's own ``preprocess_image`` cannot run on fake tensors (``ImageList`` reads the
    image sizes from tensors); the images here are already square at the padded size."""

    def __init__(self, net: nn.Module, pixel_mean: torch.Tensor, pixel_std: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("pixel_mean", pixel_mean.view(-1, 1, 1).clone(), persistent=False)
        self.register_buffer("pixel_std", pixel_std.view(-1, 1, 1).clone(), persistent=False)

    def forward(self, images):
        return self.net((images - self.pixel_mean) / self.pixel_std)


def detector_builder(variant: str, img_size: int, part: str, overrides=()):
    """The COCO config's backbone (``part="backbone"``: trunk + simple feature pyramid) or its
    ViT trunk alone (``part="trunk"``), built as benchmarks/detector_memory.py builds it
    (``variant`` is one of its VARIANTS; ``overrides``: LazyConfig ``key=value`` strings)."""
    def build():
        model = detector_memory.build_model(variant, img_size, overrides)
        net = model.backbone if part == "backbone" else model.backbone.net
        return Preprocessed(net, model.pixel_mean, model.pixel_std)
    return build


def image_inputs(img_size: int):
    return lambda batch: (torch.rand(batch, 3, img_size, img_size) * 255.0,)


def feature_loss(model, x):
    return sum(f.float().mean() for f in model(x).values())


def engine_has(option: str) -> bool:
    """Whether this checkout's engine has the option (``stored_blocks``, ``rev_backward_chunk``
    arrived with issue 13)."""
    return option in revvit_d2.modeling.EngineOptions.names()


# --------------------------------------------------------------------------------------------
# the tables
# --------------------------------------------------------------------------------------------

SIDES = ("plain", "checkpoint", "reversible", "hybrid", "chunked", "timm", "timm_checkpoint")
# The chunked backward (rev_backward_chunk) as issue 13 measures it on the CPU: chunks of 4
# samples; its per-image figure needs batches larger than a chunk.
CHUNK, CHUNK_BATCHES = 4, (8, 32)


def timm_builder(dim: int, depth: int, heads: int, img_size: int, checkpoint: bool):
    """timm's ViT as benchmarks/memory_speed.py builds its plain baseline (fused attention,
    average pooling), with ``set_grad_checkpointing`` for the checkpointed one."""
    def build():
        import timm

        model = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=dim,
                                  depth=depth, num_heads=heads, img_size=img_size,
                                  num_classes=1000, class_token=False, global_pool="avg")
        model.set_grad_checkpointing(checkpoint)
        return model
    return build


def _side_builders(side, variant, overrides, kwargs, img_size, batches):
    """[(row name, stored_blocks or None, build, batches)] for one side of one ViT size."""
    if side in MODES:
        return [(side, None, vit_builder(variant, overrides, side), batches)]
    if side == "hybrid":
        depth = kwargs["depth"]
        return [(f"hybrid_k{k}", k, vit_builder(variant, overrides, "reversible",
                                                stored_blocks=k), batches)
                for k in (depth // 4, depth // 2)]
    if side == "chunked":
        return [(f"chunked_m{CHUNK}", None, vit_builder(variant, overrides, "reversible",
                                                         rev_backward_chunk=CHUNK),
                 CHUNK_BATCHES)]
    return [(side, None, timm_builder(kwargs["embed_dim"], kwargs["depth"],
                                      kwargs["num_heads"], img_size,
                                      checkpoint=side == "timm_checkpoint"), batches)]


def vit_rows(sizes, sides, dtypes, img_size, batches, log, device="cpu") -> list:
    rows = []
    for size, (variant, overrides) in sizes.items():
        kwargs = dict(revvit_d2.modeling.get_model_kwargs(variant), **overrides)
        overrides = dict(overrides)
        if img_size != revvit_d2.get_pretrained_cfg(variant)["input_size"][-1]:
            overrides["img_size"] = img_size
        for dtype in dtypes:
            for side in sides:
                for name, k, build, bs in _side_builders(side, variant, overrides, kwargs,
                                                         img_size, batches):
                    t0 = time.perf_counter()
                    res = per_image(build, classification_inputs(img_size, 1000),
                                    classification_loss, bs, dtype, device=device)
                    paper = PAPER.get(size, {}).get(side) if dtype == "float32" else None
                    rows.append(dict(model=size, depth=kwargs["depth"], side=name, dtype=dtype,
                                     stored_blocks=k, batches=list(bs),
                                     paper_mb_per_image=paper, **res))
                    log(f"{size} {dtype} {name}: {res['mib_per_image']:.2f} MiB/image "
                        f"(constant {res['constant_mib']:.0f} MiB) "
                        f"[{time.perf_counter() - t0:.0f} s]")
    return rows


def budget_rows(vit: list, dtypes, img_size, log) -> list:
    """``revvit_d2.modeling.budget.estimate_stored_blocks_memory`` (what autograd saves, counted
    on fake tensors, plus one block's working set; the estimate ``choose_stored_blocks`` uses)
    for ViT-B beside this simulation's per-image figure for the same ``stored_blocks`` (0 =
    reversible, depth = plain autograd)."""
    from revvit_d2.modeling.budget import estimate_stored_blocks_memory

    rows = []
    variant, overrides = SIZES["vit_b"]
    model = revvit_d2.create_model(variant, num_classes=1000, drop_path_rate=0.0, **overrides)
    depth = len(model.reversible_blocks())
    for dtype in dtypes:
        sim = {r["stored_blocks"]: r["mib_per_image"] for r in vit
               if r["model"] == "vit_b" and r["dtype"] == dtype and r["stored_blocks"]}
        sim.update({0: r["mib_per_image"] for r in vit if (r["model"], r["dtype"], r["side"])
                    == ("vit_b", dtype, "reversible")})
        sim.update({depth: r["mib_per_image"] for r in vit if (r["model"], r["dtype"],
                                                                r["side"]) == ("vit_b", dtype,
                                                                               "plain")})
        est = estimate_stored_blocks_memory(model, (3, img_size, img_size),
                                            DTYPES[dtype] or torch.float32)
        for k in sorted(sim):
            rows.append(dict(model="vit_b", dtype=dtype, stored_blocks=k,
                             estimate_mib=est[k] / MIB, simulated_mib=sim[k]))
            log(f"budget vit_b {dtype} k={k}: estimate {est[k] / MIB:.1f}, "
                f"simulated {sim[k]:.1f} MiB/image")
    return rows


def detector_rows(img_size, dtypes, batches, log, parts=("trunk", "backbone"),
                  overrides=()) -> list:
    """The detector configs of benchmarks/detector_memory.py (its VARIANTS: Rev-ViT-B, the same
    with plain autograd, detectron2's ViT-B), trunk alone and trunk + feature pyramid."""
    rows = []
    for dtype in dtypes:
        for part in parts:
            for variant in detector_memory.VARIANTS:
                t0 = time.perf_counter()
                res = per_image(detector_builder(variant, img_size, part, overrides),
                                image_inputs(img_size),
                                feature_loss, batches, dtype)
                rows.append(dict(variant=variant, part=part, dtype=dtype, img_size=img_size,
                                 **res))
                log(f"detector {variant} {part} {dtype} {img_size}: "
                    f"{res['mib_per_image']:.1f} MiB/image [{time.perf_counter() - t0:.0f} s]")
    return rows
# Committed CPU peak-RSS runs of benchmarks/memory_vs_depth.py: its default run (width 192,
# depths 4-48) and Rev-ViT-B at 12 blocks, batches 2 and 6 and batches 8 and 24
# (python benchmarks/memory_vs_depth.py --model rev_vit_b --width 0 --heads 0 --depths 12
# --repeats 1 [--batch-sizes 8 24] --json docs/results/memory_model_rss_vit_b[_large].json
# --markdown docs/results/memory_model_rss_vit_b[_large].md).
VALIDATION_SOURCES = ("memory_vs_depth.json", "memory_model_rss_vit_b.json",
                      "memory_model_rss_vit_b_large.json")


def validation_rows(log, depths=None) -> list:
    """The simulation of every configuration of the committed CPU peak-RSS measurements
    (VALIDATION_SOURCES; the trunk part of docs/results/detector_memory.json),
    without an optimizer as they were measured, with the ratio simulated / measured."""
    rows = []
    for source in VALIDATION_SOURCES[:1] if depths else VALIDATION_SOURCES:
        ref = json.loads((ROOT / "docs/results" / source).read_text())
        st = ref["settings"]
        for mode in st["modes"]:
            for depth in depths or st["depths"]:
                overrides = {k: v for k, v in (("embed_dim", st["width"]),
                                               ("num_heads", st["heads"])) if v}
                res = per_image(
                    vit_builder(st["model"], dict(overrides, depth=depth), mode, num_classes=10),
                    classification_inputs(st["img_size"], 10), classification_loss,
                    st["batch_sizes"], "float32", optimizer=False)
                measured = ref["per_sample_mib"][mode][str(depth)]
                width = st["width"] or revvit_d2.modeling.get_model_kwargs(st["model"])[
                    "embed_dim"]
                rows.append(dict(source=source, model=st["model"], width=width, depth=depth,
                                 side=mode, dtype="float32", img_size=st["img_size"],
                                 batches=st["batch_sizes"], simulated_mib=res["mib_per_image"],
                                 measured_mib=measured, ratio=res["mib_per_image"] / measured))
                log(f"validate {st['model']} {mode} depth {depth}: simulated "
                    f"{res['mib_per_image']:.2f}, measured {measured:.2f} MiB/image")
    ref = json.loads((ROOT / "docs/results/detector_memory.json").read_text())
    st = ref["settings"]
    if depths is None:
        for variant in st["variants"]:
            res = per_image(detector_builder(variant, st["img_size"], "trunk"),
                            image_inputs(st["img_size"]), feature_loss, st["batch_sizes"],
                            "float32", optimizer=False)
            measured = ref["mib_per_image"]["float32"]["backbone"][variant]
            rows.append(dict(source="detector_memory.json", model=f"{variant} trunk",
                             side=variant, dtype="float32", img_size=st["img_size"],
                             batches=st["batch_sizes"], simulated_mib=res["mib_per_image"],
                             measured_mib=measured, ratio=res["mib_per_image"] / measured))
            log(f"validate detector trunk {variant}: simulated {res['mib_per_image']:.1f}, "
                f"measured {measured:.1f} MiB/image")
    return rows


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------

def machine_info() -> dict:
    return dict(python=platform.python_version(), torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                note="simulated (FakeTensorMode + MemTracker): machine-independent")


def _f(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def write_markdown(path: Path, result: dict):
    st = result["settings"]
    b1, b2 = st["batches"]
    lines = [
        "# Training memory per image, *simulated* (FakeTensorMode + MemTracker)",
        "",
        "Every number on this page is **simulated**, not measured: each model is built under "
        "PyTorch's `FakeTensorMode` (no data, nothing allocated) and one training step runs "
        "under `torch.distributed._tools.mem_tracker.MemTracker`, which counts every tensor "
        "every op creates and frees (forward, the reversible engine's backward, the AdamW "
        "step) and keeps the peak. The numbers depend on the shapes and the code path only, "
        "not on the machine. Method and limits: `benchmarks/memory_model.py` (docstring) and "
        "[performance.md](../performance.md#memory-model-simulated).",
        "",
        f"Per image = (peak at batch {b2} - peak at batch {b1}) / {b2 - b1} (ViT rows; other "
        "batches where stated), peak of forward + "
        "loss + backward in the step after a warm-up (gradients and AdamW state already "
        "allocated; `zero_grad(set_to_none=False)`). *Constant* = parameters + gradients + "
        "AdamW state (fp32 weights and optimizer in both dtypes; bf16 = `torch.autocast`). "
        "*Fixed* = peak at the smaller batch - batch x per-image - constant: fixed-size "
        "working memory at the peak (with the reversible backward mostly the blocks' parameter "
        "gradients, held until autograd adds them into the kept `.grad`; under bf16 autocast "
        "also the bf16 copies of the weights). "
        "*AdamW step* = peak during `optimizer.step()` at the smaller batch (the constant part "
        "plus the step's temporaries). Peak memory of a step at batch b, simulated = constant "
        "+ fixed + b x per image (or the AdamW step peak, if larger). MiB = 2^20 bytes.",
        "",
        f"## ViT-B/L/H, {st['img_size']}x{st['img_size']}, 1000 classes, drop path 0",
        "",
        "Sides: *plain* = Rev-ViT with `use_rev_backprop=False` (same blocks, ordinary "
        "autograd); *checkpoint* = the same with `act_checkpoint=True` (one "
        "`torch.utils.checkpoint` per block); *reversible* = the reversible backward; "
        "*hybrid_kN* = reversible with `stored_blocks=N` (the last N blocks keep their "
        "activations); *chunked_m4* = reversible with `rev_backward_chunk=4` (the backward "
        f"in chunks of 4 samples; batches {CHUNK_BATCHES[0]} and {CHUNK_BATCHES[1]}); "
        "*timm* / *timm_checkpoint* = timm's ViT as benchmarks/memory_speed.py "
        "builds its baseline (no class token, average pooling; one stream of width C where "
        "Rev-ViT carries two of width C), without and with `set_grad_checkpointing`.",
        "",
        "| model | dtype | side | MiB/image (simulated) | activations + temporaries + input "
        "| constant MiB | fixed MiB | AdamW step peak MiB | paper MB/image (measured, fp32) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["vit"]:
        kinds = r["mib_per_image_by_kind"]
        lines.append(
            f"| {r['model']} ({r['depth']} blocks) | {r['dtype']} | {r['side']} "
            f"| **{r['mib_per_image']:.1f}** | {kinds['Activation']:.1f} + {kinds['Temp']:.1f} + "
            f"{kinds['Other']:.2f} | {r['constant_mib']:.0f} | {r.get('fixed_mib', 0):.0f} | "
            f"{r['optimizer_step_peak_mib']:.0f} | {_f(r['paper_mb_per_image'])} |")
    lines += ["", "Ratios, simulated (plain / other side, same model and dtype):", ""]
    by = {(r["model"], r["dtype"], r["side"]): r["mib_per_image"] for r in result["vit"]}
    for (model, dtype, side), v in by.items():
        if side == "plain":
            continue
        plain = by.get((model, dtype, "plain"))
        if plain:
            paper = PAPER.get(model, {})
            note = (f" (paper {paper['plain'] / paper['reversible']:.1f}x)"
                    if side == "reversible" and dtype == "float32" and paper else "")
            lines.append(f"- {model} {dtype} plain / {side}: {plain / v:.1f}x{note}")
    goal = by.get(("vit_b", "float32", "reversible"))
    if goal is not None:
        chunked = by.get(("vit_b", "float32", f"chunked_m{CHUNK}"))
        lines += [
            "", f"Goal (issue 13): simulated reversible ViT-B, fp32, <= 12 MiB per image: "
            f"**{goal:.2f} MiB** at these batches ({'met' if goal <= 12 else 'not met'})"
            + (f"; with `rev_backward_chunk={CHUNK}` **{chunked:.2f} MiB** "
               f"({'met' if chunked <= 12 else 'not met'})" if chunked else "") + ". "
            "The reversible peak falls in the backward of a recomputed MLP (G): the output of "
            "fc1, the output of the GELU and the gradient of the latter, each tokens x 4C per "
            "image, are alive together with the streams, the rebuilt inputs and their "
            "gradients. At small batches the peak of the smaller batch falls elsewhere (at "
            "the end of the backward, where the fixed-size gradients dominate) and the "
            "difference gives less; from batch 6 on the slope is the one above."]
        small = {r["source"]: r for r in result["validation"]
                 if r["model"] == "rev_vit_b" and r["side"] == "reversible"}
        if small:
            lines[-1] += " Rev-ViT-B reversible, fp32, simulated vs CPU peak RSS: " + "; ".join(
                f"batches {r['batches'][0]} and {r['batches'][1]}: {r['simulated_mib']:.2f} vs "
                f"{r['measured_mib']:.2f} MiB" for r in small.values()) + "."
    if not st["hybrid"]:
        lines += ["", "Hybrid rows (`stored_blocks=k`) absent: the option was not in this "
                  "checkout's engine when the run was made."]
    if result.get("budget"):
        lines += [
            "",
            "The hybrid's budget estimate (`revvit_d2.modeling.budget."
            "estimate_stored_blocks_memory`: what autograd saves, counted on fake tensors, "
            "plus one block's working set) beside the simulated per-image figure for the same "
            "`stored_blocks` k (0 = reversible, depth = plain autograd), ViT-B:",
            "",
            "| dtype | k | budget estimate MiB/image | simulated MiB/image | estimate / "
            "simulated |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in result["budget"]:
            lines.append(f"| {r['dtype']} | {r['stored_blocks']} | {r['estimate_mib']:.1f} "
                         f"| {r['simulated_mib']:.1f} | "
                         f"{r['estimate_mib'] / r['simulated_mib']:.2f} |")
    lines += [
        "",
        "The activation and temporary columns split the per-image figure as the tracker "
        "labels the tensors alive at the peak: tensors made in the forward, or recomputed "
        "inside a module's forward during the backward, count as activations; everything else "
        "made during the backward (gradients of activations, the engine's rebuilt inputs) as "
        "temporaries. Only their sum is exact: at the backward peak the split depends on where "
        "the tracker thinks a recomputation starts.",
        "",
        "The paper's figures are GPU measurements of the official code (explicit "
        "`softmax(q k^T)` attention, which keeps the tokens x tokens map of every head for "
        "the backward); our models call `scaled_dot_product_attention`, whose fused kernels "
        "keep the output and the log-sum-exp only: most of the difference on the plain side.",
        "",
        f"## Mask R-CNN backbones at {st['detector_img_size']}x{st['detector_img_size']}",
        "",
        "The configs of `benchmarks/detector_memory.py` (`revvit_b`: Rev-ViT-B, reversible; "
        "`revvit_b_autograd`: the same, plain autograd; `vit_b`: detectron2's ViT-B, ViTDet), "
        "behind the detector's input normalisation, loss = sum of the mean of every output "
        "map. *trunk* = the ViT alone; *backbone* = ViT + simple feature pyramid. The RPN and "
        "ROI heads are not simulated: detectron2 reads sizes and selects boxes from tensor "
        "values (`ImageList.from_tensors`, anchor matching, NMS), which a fake tensor cannot "
        "answer. The CPU measurement at 512x512 (detector_memory.md) puts the heads at "
        "800-900 MiB per image there.",
        "",
        "| dtype | part | " + " | ".join(f"`{v}` MiB/image" for v in st["detector_variants"])
        + " | constant MiB (`revvit_b`, `vit_b`) |",
        "|---|---|" + "---:|" * (len(st["detector_variants"]) + 1),
    ]
    det = {(r["dtype"], r["part"], r["variant"]): r for r in result["detector"]}
    for dtype in st["dtypes"]:
        for part in ("trunk", "backbone"):
            cells = [f"**{det[(dtype, part, v)]['mib_per_image']:.0f}**"
                     for v in st["detector_variants"] if (dtype, part, v) in det]
            if not cells:
                continue
            const = ", ".join(f"{det[(dtype, part, v)]['constant_mib']:.0f}"
                              for v in ("revvit_b", "vit_b") if (dtype, part, v) in det)
            lines.append(f"| {dtype} | {part} | " + " | ".join(cells) + f" | {const} |")
    lines += [
        "",
        "## Validation against CPU peak-RSS measurements",
        "",
        "The same simulation (no optimizer, as measured) for every configuration of the "
        "committed CPU measurements; measured = (peak RSS at b2 - peak RSS at b1) / (b2 - b1) "
        "from fresh processes (`benchmarks/memory_vs_depth.py`, `benchmarks/detector_memory.py`"
        ", fp32). Acceptance: every ratio within 10% of 1.",
        "",
        "| source | model | width | side | depth | batches | simulated MiB/image "
        "| measured MiB/image | simulated / measured |",
        "|---|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in result["validation"]:
        lines.append(
            f"| {r['source']} | {r['model']} | {r.get('width', 768)} | {r['side']} "
            f"| {r.get('depth', '-')} "
            f"| {r['batches'][0]}, {r['batches'][1]} | {r['simulated_mib']:.2f} "
            f"| {r['measured_mib']:.2f} | {r['ratio']:.3f} |")
    if result["validation"]:
        worst = max(abs(r["ratio"] - 1) for r in result["validation"])
        lines += ["", f"Largest deviation: {worst * 100:.1f}% "
                  f"({'within' if worst <= 0.10 else 'outside'} 10%)."]
    m = result["machine"]
    parts = result["command"].split("; then ")
    how = (f"`{parts[0]}`" if len(parts) == 1 else
           "`python benchmarks/memory_model.py` run in parts and merged (" +
           "; ".join(f"`{c}`" for c in parts) + ")")
    lines += ["", f"Simulated with torch {m['torch']}, Python {m['python']}, {m['date']}, by "
              f"{how} in {result['settings']['wall_seconds']:.0f} s. "
              f"Raw numbers (peaks by kind at both batch sizes): `{path.stem}.json`.", ""]
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs/results/memory_model"),
                   help="writes OUT.json and OUT.md")
    p.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES),
                   help="hybrid: stored_blocks = depth/4 and depth/2 (skipped when the engine "
                        "has no such option)")
    p.add_argument("--merge", metavar="JSON", nargs="+",
                   help="keep the rows of these earlier results that this run does not "
                        "recompute (the later file wins)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batches", type=int, nargs=2, default=[32, 64],
                   help="the two batch sizes of the ViT rows (large: see the docstring)")
    p.add_argument("--detector-img-size", type=int, default=1024)
    p.add_argument("--detector-batches", type=int, nargs=2, default=[1, 2])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="device of the fake tensors of the ViT rows; cuda needs a GPU, whose "
                        "kernel choices (attention) the simulation then follows")
    p.add_argument("--no-detectors", action="store_true")
    p.add_argument("--no-validate", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (a 4-block width-64 ViT, 2-block width-64 detector trunks "
                        "at 64x64, the shallowest validation depth), under a minute; writes to "
                        "--out")
    return p.parse_args(argv)


def merge(old: dict, new: dict, args) -> dict:
    """``new`` plus the rows of ``old`` it did not recompute (same model, side and dtype for
    the ViT rows; whole sections skipped by --no-detectors / --no-validate)."""
    done = {(r["model"], r["side"], r["dtype"]) for r in new["vit"]}
    keep = [r for r in old["vit"] if (r["model"], r["side"], r["dtype"]) not in done]
    order = {m: i for i, m in enumerate(SIZES)}
    new["vit"] = sorted(keep + new["vit"], key=lambda r: (
        order.get(r["model"], -1), DTYPES_ORDER[r["dtype"]],
        SIDES.index(r["side"].split("_")[0] if r["side"].startswith(("hybrid", "chunked"))
                    else r["side"]), r["stored_blocks"] or 0))
    for section, skipped in (("detector", args.no_detectors), ("validation", args.no_validate)):
        if skipped and not new[section]:
            new[section] = old[section]
    st = new["settings"]
    st["sides"] = sorted(set(st["sides"]) | set(old["settings"].get("sides", MODES)),
                         key=SIDES.index)
    new["budget"] = new.get("budget") or old.get("budget", [])
    st["hybrid"] = st["hybrid"] or old["settings"]["hybrid"]
    st["wall_seconds"] += old["settings"]["wall_seconds"]
    new["command"] = f"{old['command']}; then {new['command']}"
    return new


def _device_name(device: str) -> str:
    if device == "cuda":
        return f"cuda (fake tensors; kernel choices of {torch.cuda.get_device_name()})"
    return "cpu (fake tensors)"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("memory_model: --device cuda needs a GPU (without one, fake CUDA tensors take "
                 "the math attention path, which no GPU run would take)")
    t0 = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    sizes = SMOKE_SIZES if args.smoke else {k: SIZES[k] for k in args.sizes}
    hybrid = engine_has("stored_blocks")
    sides = [s for s in args.sides if (s != "hybrid" or hybrid)
             and (s != "chunked" or engine_has("rev_backward_chunk"))]
    det_size = 64 if args.smoke else args.detector_img_size
    result = dict(
        settings=dict(sizes={k: dict(variant=v, overrides=o) for k, (v, o) in sizes.items()},
                      sides=sides, dtypes=args.dtypes, img_size=args.img_size,
                      batches=args.batches, detector_img_size=det_size,
                      detector_batches=args.detector_batches,
                      detector_variants=list(detector_memory.VARIANTS), hybrid=hybrid,
                      optimizer="AdamW", smoke=args.smoke, simulated=True,
                      device=_device_name(args.device)),
        machine=machine_info(),
        command=" ".join(["python", "benchmarks/memory_model.py"] + list(argv)),
    )
    result["vit"] = vit_rows(sizes, sides, args.dtypes, args.img_size, args.batches, log,
                             args.device)
    result["budget"] = []
    result["detector"] = [] if args.no_detectors else detector_rows(
        det_size, args.dtypes, args.detector_batches, log,
        **(SMOKE_DETECTOR if args.smoke else {}))
    result["validation"] = [] if args.no_validate else validation_rows(
        log, depths=[4] if args.smoke else None)
    result["settings"]["wall_seconds"] = time.perf_counter() - t0
    for path in reversed(args.merge or []):
        result = merge(json.loads(Path(path).read_text()), result, args)
    if hybrid and not args.smoke and "vit_b" in sizes and "hybrid" in sides:
        result["budget"] = budget_rows(result["vit"], args.dtypes, args.img_size, log)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_markdown(out.with_suffix(".md"), result)
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
