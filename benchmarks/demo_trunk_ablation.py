#!/usr/bin/env python
"""The trunk ablation behind the detection demo's design (docs/detection.md, "What closes the
gap"): the demo config with one change, trained from scratch for a short schedule on the
synthetic shapes and scored on its validation split.

    OMP_NUM_THREADS=1 python benchmarks/demo_trunk_ablation.py hybrid --out /tmp/ablation

Variants (all keep the demo's heads, data and optimiser; defaults as in the docs: ``--iters``
400, 27 warm-up iterations, ``--seed`` 1):

* ``patch8``: the plain Rev-ViT (linear 8x8 patch projection), 2x2 RoIAlign samples per bin
* ``relpos``: + decomposed relative position biases in every block (detectron2's
  ``add_decomposed_rel_pos``)
* ``windows``: + 4x4-token windowed attention in blocks 0-2, block 3 global
* ``dwconv``: + a depthwise 3x3 conv branch in every attention sub-block
* ``hybrid``: a HybridStem with 2 basic blocks per stage instead of the patch projection
* ``hybrid_sr1``: the same with 1 RoIAlign sample per bin
* ``hybrid_light_sr1``: 1 basic block per stage, 1 sample per bin (the demo's choice)

Prints the log's training speed and the COCO box / mask AP lines. The docs' numbers were taken
with 1 OpenMP thread per run and two runs at a time on the 2-core dev machine; compare variants
run side by side under the same load.
"""
import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "COCO" / "mask_rcnn_revvit_synthetic.py"

# config lines per variant, applied to the demo config (`model`, `L`, `HybridStem` in scope)
_PATCH8 = ["model.backbone.net.stem = None",
           "model.roi_heads.box_pooler.sampling_ratio = 2",
           "model.roi_heads.mask_pooler.sampling_ratio = 2"]
VARIANTS = {
    "patch8": _PATCH8,
    "relpos": _PATCH8 + ["model.backbone.net._target_ = demo_trunk_ablation.with_rel_pos"],
    "windows": _PATCH8 + ["model.backbone.net.update(window_size=4, global_block_indexes=(3,))"],
    "dwconv": _PATCH8 + ["model.backbone.net._target_ = demo_trunk_ablation.with_dwconv"],
    "hybrid": ["model.backbone.net.stem.blocks_per_stage = 2",
               "model.roi_heads.box_pooler.sampling_ratio = 2",
               "model.roi_heads.mask_pooler.sampling_ratio = 2"],
    "hybrid_sr1": ["model.backbone.net.stem.blocks_per_stage = 2"],
    "hybrid_light_sr1": [],  # the demo config as it is
}


# -- backbone variants (built by the generated config inside tools/train_net.py) -----------------
def with_rel_pos(**kwargs):
    """RevViTBackbone whose attention adds decomposed relative position biases."""
    from detectron2.modeling.backbone.utils import add_decomposed_rel_pos

    from revvit_d2.d2 import RevViTBackbone

    def forward(self, x, thw):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        hw = tuple(thw[1:])
        q = q.reshape(B * self.num_heads, N, self.head_dim)
        attn = (q * self.head_dim ** -0.5) @ k.reshape(B * self.num_heads, N, -1).transpose(1, 2)
        attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, hw, hw)
        out = attn.softmax(-1) @ v.reshape(B * self.num_heads, N, -1)
        out = out.reshape(B, self.num_heads, N, -1).transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(out)), tuple(thw)

    model = RevViTBackbone(**kwargs)
    for blk in model.blocks:
        attn = blk.F.attn
        size = 2 * 24 - 1  # interpolated by detectron2 to the actual grid
        attn.rel_pos_h = nn.Parameter(torch.zeros(size, attn.head_dim))
        attn.rel_pos_w = nn.Parameter(torch.zeros(size, attn.head_dim))
        nn.init.trunc_normal_(attn.rel_pos_h, std=0.02)
        nn.init.trunc_normal_(attn.rel_pos_w, std=0.02)
        attn.forward = forward.__get__(attn)
    return model


class _DWConvF(nn.Module):
    """F of a reversible block plus a depthwise 3x3 conv branch on the token grid."""

    def __init__(self, f, dim):
        super().__init__()
        self.f = f
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pw = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.pw.weight, std=0.02)
        nn.init.zeros_(self.pw.bias)

    def forward(self, x, thw):
        B, N, C = x.shape
        y = self.f.norm(x).transpose(1, 2).reshape(B, C, thw[1], thw[2])
        z = self.dw(y).flatten(2).transpose(1, 2)
        return self.f(x, thw) + self.pw(nn.functional.gelu(z))


def with_dwconv(**kwargs):
    from revvit_d2.d2 import RevViTBackbone

    model = RevViTBackbone(**kwargs)
    for blk in model.blocks:
        blk.F = _DWConvF(blk.F, model.embed_dim)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--out", default="output/demo_trunk_ablation")
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=80 / 1200,
                        help="warm-up fraction of the schedule (default: the 1200-iteration "
                             "demo's 80 iterations, 27 of 400, as in the docs' runs)")
    args = parser.parse_args()

    out = Path(args.out).resolve() / args.variant
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.py"
    config.write_text(textwrap.dedent(f"""\
        import demo_trunk_ablation
        from detectron2.config import LazyConfig

        _demo = LazyConfig.load({str(DEMO)!r})
        model, dataloader, train = _demo.model, _demo.dataloader, _demo.train
        optimizer, lr_multiplier = _demo.optimizer, _demo.lr_multiplier
        """) + "\n".join(VARIANTS[args.variant]) + "\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]))
    log = out / "train.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "train_net.py"), "--config-file", str(config),
             f"train.output_dir={out / 'run'}", f"train.max_iter={args.iters}",
             f"train.eval_period={args.iters}", f"train.checkpointer.period={args.iters}",
             f"train.seed={args.seed}", f"lr_multiplier.warmup_length={args.warmup}"],
            stdout=f, stderr=subprocess.STDOUT, env=env)
    lines = log.read_text().splitlines()
    for line in lines:
        if "Overall training speed" in line or "copypaste: " in line:
            print(line.split("]: ", 1)[-1])
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
