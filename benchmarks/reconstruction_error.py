#!/usr/bin/env python
"""How exact is the inversion? Reconstruction error of the reversible stack versus depth.

For a Rev-ViT stack of each depth, run the blocks forward and keep every block's true input
(X1, X2); then start from the last output and invert block by block exactly as the reversible
backward does (X2 = Y2 - G(Y1), X1 = Y1 - F(X2)), and report the relative error of the rebuilt
input of the first block, max|x_rebuilt - x_true| / max|x_true|, and of the gradients of a
reversible backward against plain autograd: the input gradient (cosine and relative max error)
and the worst parameter tensor (lowest cosine, largest relative max error).

``--anchor-every k`` (several values allowed; 0 = off) repeats every measurement with the
streams stored every k blocks (``rev_anchor_every``): the inversion then restarts from a stored
pair every k blocks, so the rebuilt first-block input carries the error of k blocks, not of the
whole depth.

Precisions: float64, float32, bfloat16 autocast (the recomputation runs under the same
autocast state as the forward, as the engine does; the residual streams stay float32), and
"bfloat16-streams" (the whole model cast to bfloat16, so the streams themselves are bfloat16).
Random init (the official initialisation); trained weights may behave differently: the error grows with |activations| / |residual branch|.

    python benchmarks/reconstruction_error.py --out docs/results/reconstruction_error
"""
import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone

import torch

import revvit_d2


def invert(blocks, y1, y2, thw):
    with torch.no_grad():
        for blk in reversed(blocks):
            x2 = y2 - blk.G(y1)
            x1 = y1 - blk.F(x2, thw)
            y1, y2 = x1, x2
    return y1, y2


def _grad_errors(a: torch.Tensor, b: torch.Tensor):
    """(cosine, max|a - b| / max|b|) of two gradients, b the reference."""
    a, b = a.flatten().double(), b.flatten().double()
    cos = torch.nn.functional.cosine_similarity(a, b, 0).item()
    return cos, ((a - b).abs().max() / b.abs().max()).item()


def measure(depth, width, heads, tokens, batch, precision, device, seed=0, anchor_every=0):
    torch.manual_seed(seed)
    model = revvit_d2.create_model("rev_vit_s", embed_dim=width, num_heads=heads, depth=depth,
                                   img_size=16 * int(tokens ** 0.5), drop_path_rate=0.0)
    dtype = {"float64": torch.float64, "bfloat16-streams": torch.bfloat16}.get(precision,
                                                                             torch.float32)
    model = model.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, 3, 16 * int(tokens ** 0.5), 16 * int(tokens ** 0.5), device=device,
                    dtype=dtype)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=precision == "bfloat16")
    with torch.no_grad(), autocast:
        t, thw = model.patch_embed(x)
        t = t + model._pos_embed(thw[1:])
        x1, x2 = t, t
        first = (x1.float().clone(), x2.float().clone())
        # the first chunk's output: the last block's, or with anchoring the stored pair after
        # block k (the inversion of the first chunk starts there)
        chunk = anchor_every if 0 < anchor_every < depth else depth
        for blk in model.blocks[:chunk]:
            x1, x2 = blk(x1, x2, thw)
        r1, r2 = invert(model.blocks[:chunk], x1, x2, thw)
    scale = max(first[0].abs().max().item(), 1e-30)
    err = max((r1.float() - first[0]).abs().max().item(),
              (r2.float() - first[1]).abs().max().item()) / scale

    # Gradients: reversible backward vs plain autograd, same precision.
    grads = []
    model.rev_anchor_every = anchor_every
    for use_rev in (True, False):
        model.use_rev_backprop = use_rev
        model.train()
        xi = x.clone().requires_grad_(True)
        with autocast:
            loss = model(xi).float().pow(2).mean()
        loss.backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    cos, grad_err = _grad_errors(grads[0][0], grads[1][0])
    params = [_grad_errors(a, b) for a, b in zip(grads[0][1:], grads[1][1:]) if b.any()]
    return {"depth": depth, "precision": precision, "anchor_every": anchor_every,
            "reconstruction_rel_err": err, "input_grad_cosine": cos,
            "input_grad_rel_err": grad_err,
            "param_grad_min_cosine": min(c for c, _ in params),
            "param_grad_max_rel_err": max(e for _, e in params)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[12, 24, 48, 96])
    p.add_argument("--precisions", nargs="+",
                   default=["float64", "float32", "bfloat16", "bfloat16-streams"])
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--tokens", type=int, default=196, help="a square number (196 = 224/16 ^2)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--anchor-every", type=int, nargs="+", default=[0],
                   help="rev_anchor_every values to compare (0 = no re-anchoring)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="docs/results/reconstruction_error")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = []
    for precision in args.precisions:
        for anchor_every in args.anchor_every:
            for depth in args.depths:
                row = measure(depth, args.width, args.heads, args.tokens, args.batch, precision,
                              device, anchor_every=anchor_every)
                print(json.dumps(row), flush=True)
                rows.append(row)
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            platform.processor() or platform.machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"machine": info, "settings": vars(args), "rows": rows}, f, indent=1)
    lines = ["# Reconstruction error of the inversion vs depth", "",
             f"Rev-ViT width {args.width}, {args.heads} heads, {args.tokens} tokens, batch "
             f"{args.batch}, official random init; {info['device']}, torch {info['torch']}, "
             f"{info['date']}; `{' '.join(['python'] + sys.argv)}`.", "",
             "| precision | anchor every | depth | rebuilt first-block input, rel. max error | "
             "input grad cosine (rev vs plain) | input grad rel. max error | parameter grads: "
             "lowest cosine | parameter grads: largest rel. max error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['anchor_every'] or 'off'} | {r['depth']} | "
                     f"{r['reconstruction_rel_err']:.2e} | {r['input_grad_cosine']:.6f} | "
                     f"{r['input_grad_rel_err']:.2e} | {r['param_grad_min_cosine']:.6f} | "
                     f"{r['param_grad_max_rel_err']:.2e} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.md")


if __name__ == "__main__":
    main()
