#!/usr/bin/env python
"""Recovery after fine-tuning: a plain ViT trained on the built-in shape folder, converted to a
Rev-ViT and fine-tuned with the reversible backward, against the references that decide
whether the conversion is worth it.

Runs, all on the same data (the built-in synthetic ImageNet-layout folder,
:func:`revvit_d2.data.synthetic.imagenet.make_synthetic_imagefolder`, generated with more
images per class than the demo's), the same seeds and the same order of batches:

* ``plain``: a timm ``VisionTransformer`` (no class token, mean pooling, as in
  ``vit_conversion_gap.py``) trained N steps from scratch; val top-1.
* ``<rewire>@conversion``: the same weights converted (:func:`revvit_d2.plain_vit_to_rev_vit`)
  and evaluated at once; ``<rewire>+ft``: then fine-tuned M steps with the reversible backward
  on (checked: the autograd graph holds the engine's node, and the gradients equal plain
  autograd's on the same model, largest relative error recorded before and after). Rewirings:
  ``re2tal``; ``dr2net`` at beta 0.7 held fixed; ``dr2net`` with beta moved 0.7 -> 1 over the
  first half of the fine-tuning (``set_dual_residual`` every step), which ends as an ordinary
  Rev-ViT.
* ``rev_scratch``: a Rev-ViT of the same size from its own initialisation, M steps with the
  from-scratch recipe (the same budget as the fine-tuning).
* ``plain+ft``: the plain model fine-tuned M more steps with the fine-tuning recipe (the fair
  reference: the same extra budget without any conversion).

Defaults (width 64, depth 6, patch 4, 32 px, batch 32, N = 2000, M = 300) fit in about 9
minutes on one CPU thread; at 64 px with patch 8 and a few hundred steps the plain ViT stayed at
chance on this data. AdamW (timm's ``create_optimizer_v2``: no decay on norms and biases),
cosine with linear warmup (timm's ``CosineLRScheduler``), augmentation: horizontal flip and a
shift of up to 4 px (reflect-padded crop). Images are squashed to the model's square input (the shapes lie anywhere
in the non-square images; a centre crop would cut some off) and decoded once.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/vit_recovery.py --out docs/results/vit_recovery_cpu

``--smoke`` runs every piece at toy size in a temporary folder (seconds).
"""
import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as nnf
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import command_line  # noqa: E402
from vit_conversion_gap import _grad_error  # noqa: E402  (rev vs plain-autograd gradients)

import revvit_d2  # noqa: E402
from revvit_d2.data.imagefolder import SafeImageFolder, describe_skips  # noqa: E402
from revvit_d2.data.synthetic.imagenet import make_synthetic_imagefolder  # noqa: E402
from revvit_d2.utils.paths import default_datasets_root  # noqa: E402
from revvit_d2.utils.seeding import derive_seed, seed_all  # noqa: E402
from revvit_d2.vit_import import set_dual_residual  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHIFT = 4  # augmentation: random shift of up to this many pixels


# ------------------------------------------------------------------------------------------
# Data: decoded once into tensors; one seeded stream of augmented batches
# ------------------------------------------------------------------------------------------
def load_split(root, split, img):
    """(images (N, 3, img, img) normalised, labels (N,), skipped {path: reason})."""
    tf = T.Compose([T.Resize((img, img), interpolation=T.InterpolationMode.BICUBIC),
                    T.ToTensor(), T.Normalize(MEAN, STD)])
    ds = SafeImageFolder(Path(root) / split, transform=tf)
    xs, ys = [], []
    for i in range(len(ds)):
        item = ds[i]
        if isinstance(item, tuple):
            xs.append(item[0])
            ys.append(item[1])
    if not xs:
        raise ValueError(f"no readable images in {Path(root) / split}")
    return torch.stack(xs), torch.tensor(ys), dict(ds.skipped_files)


def batches(x, y, steps, batch, seed):
    """`steps` augmented batches (flip, shift <= SHIFT px) in an order fixed by `seed`: every
    run given the same seed sees the same images, flips and shifts in the same order."""
    g = torch.Generator().manual_seed(seed)
    n, img = x.shape[0], x.shape[-1]
    padded = nnf.pad(x, (SHIFT,) * 4, mode="reflect")
    order = torch.randperm(n, generator=g)
    pos = 0
    for _ in range(steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + batch]
        pos += batch
        flip = torch.rand(batch, generator=g) < 0.5
        dx = torch.randint(0, 2 * SHIFT + 1, (batch,), generator=g)
        dy = torch.randint(0, 2 * SHIFT + 1, (batch,), generator=g)
        out = torch.stack([padded[i, :, a:a + img, b:b + img] for i, a, b in zip(idx, dy, dx)])
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        yield out, y[idx]


# ------------------------------------------------------------------------------------------
# Models, training, evaluation
# ------------------------------------------------------------------------------------------
def model_kwargs(args, num_classes):
    return dict(img_size=args.img, patch_size=args.patch, embed_dim=args.width,
                depth=args.depth, num_heads=args.heads, num_classes=num_classes)


def build_plain(kw, seed):
    seed_all(seed)
    return VisionTransformer(**kw, class_token=False, global_pool="avg", fc_norm=False)


def build_rev_scratch(kw, seed):
    seed_all(seed)
    return revvit_d2.RevViT(**kw, fuse="avg_prenorm")  # the re2tal model's shape


def uses_reversible_backward(model, x):
    """True when a training forward of `model` records the reversible engine's autograd node
    (not plain autograd through the blocks)."""
    seen, stack = set(), [model(x).sum().grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "RevBackProp" in type(node).__name__:
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


def train(model, data, steps, lr, warmup, seed, batch, weight_decay, on_step=None,
          progress=0):
    """AdamW + cosine (per step, linear warmup) for `steps` steps on the seeded batch stream.
    ``on_step(model, step)`` runs before each step (the beta schedule). Returns the mean loss of
    the first and last tenth of the steps and the seconds taken."""
    model.train()
    opt = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay)
    sched = CosineLRScheduler(opt, t_initial=steps, lr_min=lr * 0.01, warmup_t=warmup,
                              warmup_lr_init=lr * 0.01, t_in_epochs=False)
    losses, t0 = [], time.perf_counter()
    for step, (xb, yb) in enumerate(batches(*data, steps, batch, seed)):
        if on_step is not None:
            on_step(model, step)
        sched.step_update(step)
        loss = nnf.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss {loss.item()} at step {step}")
        losses.append(loss.item())
        if progress and (step + 1) % progress == 0:
            print(f"  step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    k = max(1, steps // 10)
    return {"steps": steps, "lr": lr, "first_loss": sum(losses[:k]) / k,
            "last_loss": sum(losses[-k:]) / k, "seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def top1(model, x, y, batch=250):
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
                  for i in range(0, len(y), batch))
    return 100.0 * correct / len(y)


def beta_schedule(start, ramp_steps):
    """on_step: beta from `start` to 1 linearly over `ramp_steps`, then 1 (alpha = 1 - beta)."""
    def on_step(model, step):
        beta = min(1.0, start + (1.0 - start) * step / max(1, ramp_steps))
        set_dual_residual(model, 1.0 - beta, beta)
    return on_step


def reversibility(model, x):
    """The reversible backward really runs, and its gradients match plain autograd's."""
    model.train()
    used = uses_reversible_backward(model, x)
    err = _grad_error(model, x)  # leaves use_rev_backprop False
    model.use_rev_backprop = True
    model.zero_grad(set_to_none=True)
    return {"reversible_backward_used": used, "param_grad_max_rel_err": err}


# ------------------------------------------------------------------------------------------
# The runs
# ------------------------------------------------------------------------------------------
def run(args, log=lambda s: print(s, flush=True)):
    torch.set_num_threads(args.threads)
    root = make_synthetic_imagefolder(args.data, train_per_class=args.train_per_class,
                                      val_per_class=args.val_per_class)
    xtr, ytr, skip_tr = load_split(root, "train", args.img)
    xva, yva, skip_va = load_split(root, "val", args.img)
    classes = int(ytr.max()) + 1
    log(f"data {root}: {len(ytr)} train / {len(yva)} val images, {classes} classes "
        f"({describe_skips({**skip_tr, **skip_va})})")
    kw = model_kwargs(args, classes)
    data = (xtr, ytr)
    probe = xva[:args.batch_check]
    ft_warm = max(1, args.ft_steps // 10)
    common = dict(batch=args.batch, weight_decay=args.weight_decay, progress=250)
    rows = []

    def record(name, model, **extra):
        row = {"run": name, "top1": top1(model, xva, yva), **extra}
        log(json.dumps(row))
        rows.append(row)
        return row

    plain = build_plain(kw, args.seed)
    pre = train(plain, data, args.steps, args.lr, max(1, args.steps // 10),
                derive_seed(args.seed, 1), **common)
    record("plain", plain, train=pre)
    plain_sd = {k: v.clone() for k, v in plain.state_dict().items()}

    ft_seed = derive_seed(args.seed, 2)  # one batch order for every M-step run
    variants = [("re2tal", "re2tal", 1.0, None)]
    for beta in args.betas:
        variants.append((f"dr2net(beta={beta:g})", "dr2net", beta, None))
        variants.append((f"dr2net(beta={beta:g}->1)", "dr2net", beta,
                         beta_schedule(beta, args.ft_steps // 2)))
    for name, rewire, beta, schedule in variants:
        model = revvit_d2.plain_vit_to_rev_vit(plain_sd, kw, rewire=rewire, beta=beta)
        record(f"{name}@conversion", model)
        before = reversibility(model, probe)
        ft = train(model, data, args.ft_steps, args.ft_lr, ft_warm, ft_seed, on_step=schedule,
                   **common)
        after = reversibility(model, probe)
        if not (before["reversible_backward_used"] and after["reversible_backward_used"]):
            raise RuntimeError(f"{name}: the fine-tuning did not use the reversible backward")
        record(f"{name}+ft", model, train=ft, rev_check_start=before, rev_check_end=after,
               final_alpha_beta=list(getattr(model, "dual_residual", None) or (0.0, 1.0)))

    scratch = build_rev_scratch(kw, args.seed)
    ft = train(scratch, data, args.ft_steps, args.lr, ft_warm, ft_seed, **common)
    record("rev_scratch", scratch, train=ft, rev_check_end=reversibility(scratch, probe))

    plain.load_state_dict(plain_sd)
    ft = train(plain, data, args.ft_steps, args.ft_lr, ft_warm, ft_seed, **common)
    record("plain+ft", plain, train=ft)
    return rows, {"train_images": len(ytr), "val_images": len(yva), "classes": classes,
                  "skipped": len(skip_tr) + len(skip_va), "model_kwargs": kw}


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------
def _row_md(r, plain_ft):
    t, rc = r.get("train"), r.get("rev_check_end") or {}
    err = rc.get("param_grad_max_rel_err")
    err = "-" if not rc else ("overflow" if err is None else f"{err:.1e}")
    loss = f"{t['last_loss']:.3f}" if t else "-"
    return (f"| {r['run']} | {t['steps'] if t else 0} | {r['top1']:.1f} | "
            f"{r['top1'] - plain_ft:+.1f} | {loss} | "
            f"{'yes' if rc.get('reversible_backward_used') else '-'} | {err} |")


def write(out, args, rows, data_info, seconds, argv=()):
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": args.threads,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    by = {r["run"]: r for r in rows}
    plain, plain_ft = by["plain"]["top1"], by["plain+ft"]["top1"]
    best = max((r for r in rows if r["run"].endswith("+ft") and r["run"] != "plain+ft"),
               key=lambda r: r["top1"])
    verdict = {"best_converted": best["run"], "best_converted_top1": best["top1"],
               "gap_to_plain_ft": best["top1"] - plain_ft, "gap_to_plain": best["top1"] - plain,
               "within_1_point_of_plain_ft": best["top1"] >= plain_ft - 1.0,
               "above_rev_scratch": best["top1"] > by["rev_scratch"]["top1"]}
    cmd = command_line(__file__, list(argv))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "command": cmd, "settings": {**vars(args), "data": str(args.data)},
               "data": data_info, "seconds": round(seconds, 1), "rows": rows,
               "verdict": verdict}
    Path(str(out) + ".json").write_text(json.dumps(payload, indent=1) + "\n")
    kw = data_info["model_kwargs"]
    chance = 100.0 / data_info["classes"]
    lines = [
        "# Recovery after fine-tuning: plain ViT -> Rev-ViT on the built-in shape folder", "",
        f"timm `VisionTransformer` width {kw['embed_dim']}, depth {kw['depth']}, "
        f"{kw['num_heads']} heads, patch {kw['patch_size']}, {kw['img_size']} px, no class "
        f"token, mean pooling; {data_info['train_images']} train / {data_info['val_images']} "
        f"val images, {data_info['classes']} classes (chance {chance:.0f} %); batch "
        f"{args.batch}, AdamW, cosine; N = {args.steps} steps from scratch (lr {args.lr:g}), "
        f"M = {args.ft_steps} fine-tuning steps (lr {args.ft_lr:g}; from scratch: lr "
        f"{args.lr:g}), seed {args.seed}. {info['device']} CPU, {args.threads} thread(s), torch "
        f"{info['torch']}, {info['date']}, {seconds / 60:.1f} min in all; `{cmd}`.", "",
        "Val top-1 (%); delta against `plain+ft` (the plain model fine-tuned the same M "
        "steps). `reversible`: the fine-tuning's autograd graph holds the reversible engine's "
        "node; `grad err`: largest relative error of a parameter gradient, reversible backward "
        "vs plain autograd on the same model, float32, at the end of the run.", "",
        "| run | steps | top-1 | vs plain+ft | final train loss | reversible | grad err |",
        "|---|---:|---:|---:|---:|---|---:|"]
    lines += [_row_md(r, plain_ft) for r in rows]
    lines += ["", f"Best converted: `{best['run']}` {best['top1']:.1f} %, "
              f"{verdict['gap_to_plain_ft']:+.1f} points against plain+ft "
              f"({plain_ft:.1f} %), {verdict['gap_to_plain']:+.1f} against the plain model "
              f"before its extra steps ({plain:.1f} %); Rev-ViT from scratch with the same M "
              f"steps: {by['rev_scratch']['top1']:.1f} %. Target (within 1 point of plain+ft, "
              f"above from scratch): "
              f"{'met' if verdict['within_1_point_of_plain_ft'] and verdict['above_rev_scratch'] else 'not met'}."]
    Path(str(out) + ".md").write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=default_datasets_root() / "imagenet_synthetic_recovery",
                   help="where the shape folder is generated (once)")
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--val-per-class", type=int, default=100)
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=2000, help="N: plain training steps")
    p.add_argument("--ft-steps", type=int, default=300, help="M: fine-tuning steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ft-lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--betas", type=float, nargs="*", default=[0.7],
                   help="dr2net start betas (each run fixed and scheduled to 1); none: re2tal only")
    p.add_argument("--batch-check", type=int, default=8, help="images of the gradient check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared machine 2 threads ran slower)")
    p.add_argument("--smoke", action="store_true", help="toy sizes in a temporary folder")
    p.add_argument("--out", default="docs/results/vit_recovery_cpu")
    args = p.parse_args(argv)
    if args.smoke:
        args.train_per_class, args.val_per_class, args.img, args.patch = 4, 2, 16, 8
        args.width, args.depth, args.heads, args.batch = 16, 2, 2, 8
        args.steps, args.ft_steps, args.batch_check = 4, 2, 2
    for name in ("steps", "ft_steps", "batch", "width", "depth", "heads", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(not 0 < b < 1 for b in args.betas):
        p.error("--betas must lie in (0, 1)")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            args.data = Path(tmp) / "shapes"
            rows, info = run(args)
    else:
        rows, info = run(args)
    write(args.out, args, rows, info, time.perf_counter() - t0,
          sys.argv[1:] if argv is None else argv)
    print(f"wrote {args.out}.md")


if __name__ == "__main__":
    main()
