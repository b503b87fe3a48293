#!/usr/bin/env python
"""The function gap at conversion: a plain timm ViT against the Rev-ViT made from its weights.

For randomly initialised timm ``VisionTransformer``s of a few sizes (no class token, mean
pooling over the normalised tokens, so that the only difference left is the rewiring), convert
the weights (:func:`revvit_d2.plain_vit_to_rev_vit`) with each rewiring and compare, on the same
input batch:

* features: the pooled, normalised features (the head's input), relative L2 error;
* tokens: the normalised tokens before pooling, relative L2 error;
* logits: relative L2 error (a random 1000-class head);
* reversibility of the converted model in float32: the worst parameter's gradient, reversible
  backward against plain autograd on the same converted model (relative max error), and the
  rebuilt input of the first block after inverting the whole stack (relative max error).

Rewirings: ``re2tal`` (mean of the two streams, the default), ``re2tal-last`` (the same network,
second stream only: the fusion ablation), and ``dr2net`` at several beta (alpha = 1 - beta). timm's own
initialisation (weights of trained models may behave differently; the fine-tuning recovery is
measured separately).

    python benchmarks/vit_conversion_gap.py --img 112 --out docs/results/vit_conversion_gap_cpu
"""
import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone

import torch
from timm.models.vision_transformer import VisionTransformer

import revvit_d2
from revvit_d2.vit_import import set_dual_residual

SIZES = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}


def _rel(a, b):
    return ((a - b).double().norm() / b.double().norm()).item()


def _relmax(a, b):
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    return err if err == err and err != float("inf") else None  # None: overflow (inf / nan)


def _fmt(v):
    return "overflow" if v is None else f"{v:.2e}"


def _invert_error(model, x):
    """Relative max error of the first block's input rebuilt from the last block's output."""
    with torch.no_grad():
        t, thw = model.patch_embed(x)
        t = t + model._pos_embed(thw[1:])
        y1, y2 = t, t
        for blk in model.blocks:
            y1, y2 = blk(y1, y2, thw)
        for blk in reversed(model.blocks):
            x2 = y2 - blk.G(y1)
            y1, y2 = y1 - blk.F(x2, thw), x2
    errs = [_relmax(y1, t), _relmax(y2, t)]
    return None if None in errs else max(errs)


def _grad_error(model, x):
    grads = []
    for rev in (True, False):
        model.use_rev_backprop = rev
        model.zero_grad(set_to_none=True)
        model(x).float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    errs = [_relmax(grads[0][n], g) for n, g in grads[1].items() if g.abs().max() > 0]
    return None if None in errs else max(errs)


def measure(size, depth, img, batch, rewire, beta):
    width, heads = SIZES[size]
    kw = dict(img_size=img, patch_size=16, embed_dim=width, depth=depth, num_heads=heads,
              num_classes=1000)
    torch.manual_seed(0)
    plain = VisionTransformer(**kw, class_token=False, global_pool="avg", fc_norm=False).eval()
    x = torch.randn(batch, 3, img, img)
    kind = "dr2net" if rewire == "dr2net" else "re2tal"
    model = revvit_d2.plain_vit_to_rev_vit(plain.state_dict(), kw, rewire=kind, beta=beta)
    if rewire == "re2tal-last":  # the same weights, the second stream only
        last = revvit_d2.RevViT(**kw, fuse="last_prenorm")
        last.load_state_dict(model.state_dict())
        model = set_dual_residual(last, 0.0, 1.0)
    model.eval()
    with torch.no_grad():
        ref_tokens = plain.norm(_plain_tokens(plain, x))
        ref_feat = ref_tokens.mean(1)
        ref_logits = plain.head(ref_feat)
        tokens, _ = model.forward_tokens(x)
        ours_tokens = model.fuse_and_norm(tokens)
        ours_feat = ours_tokens.mean(1)
        ours_logits = model.head(ours_feat)
    row = {"size": size, "width": width, "depth": depth, "rewire": rewire,
           "alpha": 1.0 - beta if rewire == "dr2net" else 0.0,
           "beta": beta if rewire == "dr2net" else 1.0,
           "features_rel_err": _rel(ours_feat, ref_feat),
           "tokens_rel_err": _rel(ours_tokens, ref_tokens),
           "logits_rel_err": _rel(ours_logits, ref_logits),
           "reconstruction_rel_err": _invert_error(model, x)}
    model.train()
    row["param_grad_max_rel_err"] = _grad_error(model, x)
    return row


def _plain_tokens(plain, x):
    """timm's token path without the final norm (patch embed, position, blocks)."""
    t = plain.patch_embed(x)
    t = plain._pos_embed(t)
    return plain.blocks(plain.norm_pre(t))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--betas", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.2, 0.1, 0.01])
    p.add_argument("--out", default="docs/results/vit_conversion_gap_cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    plan = [("re2tal", 1.0), ("re2tal-last", 1.0)] + [("dr2net", b) for b in args.betas]
    rows = []
    for size in args.sizes:
        for rewire, beta in plan:
            row = measure(size, args.depth, args.img, args.batch, rewire, beta)
            print(json.dumps(row), flush=True)
            rows.append(row)
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "device": platform.processor() or platform.machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"machine": info, "settings": vars(args), "rows": rows}, f, indent=1)
    lines = ["# Function gap at conversion: plain timm ViT vs the converted Rev-ViT", "",
             f"timm `VisionTransformer` (no class token, mean pooling, timm's random init), "
             f"depth {args.depth}, {args.img} px, patch 16, batch {args.batch}, float32; "
             f"{info['device']} CPU, torch {info['torch']}, {info['date']}; "
             f"`{' '.join(['python'] + sys.argv)}`.", "",
             "Relative L2 errors against the plain model on the same input; the last two "
             "columns check that the converted model stays reversible (float32).", "",
             "| size | rewire | alpha | beta | features | tokens | logits | rebuilt first-block "
             "input, rel. max error | param grads rev vs plain, largest rel. max error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']} ({r['width']}) | {r['rewire']} | {r['alpha']:g} | "
                     f"{r['beta']:g} | {r['features_rel_err']:.2e} | {r['tokens_rel_err']:.2e} "
                     f"| {r['logits_rel_err']:.2e} | {_fmt(r['reconstruction_rel_err'])} | "
                     f"{_fmt(r['param_grad_max_rel_err'])} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.md")


if __name__ == "__main__":
    main()
