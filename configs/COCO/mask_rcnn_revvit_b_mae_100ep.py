"""Rev-ViT-B Mask R-CNN from MAE pre-training: the ViTDet ViT-B recipe (LSJ 1024, 100 epochs,
AdamW with layer-wise lr decay 0.7, drop path 0.1, windows of 14 with global blocks 2, 5, 8, 11)
with the MAE initialisation ViTDet uses, converted on the fly.

    python tools/train_net.py --config-file configs/COCO/mask_rcnn_revvit_b_mae_100ep.py \
        --num-gpus 8 train.init_checkpoint=mae_pretrain_vit_base.pth

``train.init_checkpoint`` takes MAE's pre-training file as released (``{"model": ...}`` with the
decoder); the loader detects the 'mae' format (docs/vit_import.md): the attention of plain block
i becomes F of reversible block i, its MLP G, the decoder, mask token and class token are
dropped and listed in the log, the 14 x 14 position embedding is resized to the 64 x 64 grid.
The rewiring is Re^2TAL's: both streams start from the patch tokens, and the model is an
ordinary Rev-ViT, reversible from the first step. Its fusion here is ``"avg_prenorm"`` (the mean
of the two streams, then MAE's final norm unchanged), so the pyramid reads 768 channels as in
ViTDet; the supervised-init config mask_rcnn_revvit_b_100ep.py keeps the official ``"concat"``
(1536 channels, the norm would be duplicated over the streams). Differences from ViTDet's ViT-B
(51.6 box AP with MAE init): the backbone is reversible, and it has no relative positions
(ViTDet's start from zero at MAE init; Rev-ViT's attention has absolute positions only). Not
trained here: no COCO box AP of this config is claimed (docs/detection.md).
"""
from .mask_rcnn_revvit_b_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.fuse = "avg_prenorm"  # Re^2TAL's fusion: MAE's final norm applies unchanged
train.init_checkpoint = "mae_pretrain_vit_base.pth"
