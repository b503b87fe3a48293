"""The plain counterpart of the built-in demo: detectron2's own ViT (the ViTDet backbone) in the
demo's Mask R-CNN, on the same synthetic COCO set, with the same data, pyramid, heads, schedule
and optimizer. The starting point of benchmarks/vit_recovery_detection.py, which converts the
trained detector into a Rev-ViT one (``train.init_checkpoint``) and fine-tunes it reversibly.

    python tools/train_net.py --config-file configs/COCO/mask_rcnn_vit_synthetic.py

Differences from the demo: the tokens come from the ViT's linear 8x8 patch projection (detectron2's
ViT has no stem option; the demo's Rev-ViT uses a HybridStem, docs/detection.md), and there are
no relative positions (``use_rel_pos=False``: Rev-ViT has absolute positions only, so the
converter refuses relative-position tables).
"""
from functools import partial

import torch.nn as nn
from detectron2.config import LazyCall as L
from detectron2.modeling import ViT

from .mask_rcnn_revvit_synthetic import dataloader, lr_multiplier, model, optimizer, train

# The demo's trunk dimensions (128 wide, 4 blocks of 4 heads, global attention) as a plain ViT.
model.backbone.net = L(ViT)(
    img_size=128,
    pretrain_img_size=128,  # the position-embedding grid: 16 x 16, interpolated for other sizes
    patch_size=8,
    embed_dim=128,
    depth=4,
    num_heads=4,
    drop_path_rate=0.0,
    window_size=0,
    mlp_ratio=4,
    qkv_bias=True,
    norm_layer=partial(nn.LayerNorm, eps=1e-6),
    window_block_indexes=(),
    use_rel_pos=False,
    pretrain_use_cls_token=False,
    out_feature="last_feat",
)
train.output_dir = "./output/mask_rcnn_vit_synthetic"
