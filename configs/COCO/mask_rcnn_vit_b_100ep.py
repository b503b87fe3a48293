"""Plain (non-reversible) ViT-B baseline with exactly the recipe of mask_rcnn_revvit_b_100ep.py,
for side-by-side memory and AP: detectron2's own ViT with the same windows, absolute position
embeddings only, the same pyramid, data, schedule and optimizer.
"""
from functools import partial

import torch.nn as nn
from detectron2.config import LazyCall as L
from detectron2.modeling import ViT

from .mask_rcnn_revvit_b_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net = L(ViT)(
    img_size=1024,
    pretrain_img_size=224,
    patch_size=16,
    embed_dim=768,
    depth=12,
    num_heads=12,
    drop_path_rate=0.1,
    window_size=14,
    mlp_ratio=4,
    qkv_bias=True,
    norm_layer=partial(nn.LayerNorm, eps=1e-6),
    window_block_indexes=[0, 1, 3, 4, 6, 7, 9, 10],
    use_rel_pos=False,
    pretrain_use_cls_token=False,
    out_feature="last_feat",
)
train.init_checkpoint = ""  # a plain ViT-B ImageNet checkpoint in detectron2 naming, if any
