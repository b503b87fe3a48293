"""Rev-ViT-B Mask R-CNN, the ViTDet ViT-B recipe (LSJ 1024, 100 epochs, layer-wise lr decay).

    python tools/train_net.py --config-file configs/COCO/mask_rcnn_revvit_b_100ep.py \
        --num-gpus 8 train.init_checkpoint=REV_VIT_B.pyth

``train.init_checkpoint`` takes the official SlowFast (or mmpretrain) ImageNet checkpoint and
converts it on the fly. Differences from ViTDet's ViT-B: the backbone is reversible (its
activation memory does not grow with depth), it has absolute position embeddings only (no
relative positions), and its ImageNet init is supervised (81.8 %), not MAE.
"""
from functools import partial

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from ..common.coco_loader_lsj import dataloader
from ..common.models.mask_rcnn_revvit import model

train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
train.init_checkpoint = "REV_VIT_B.pyth"

# Schedule: 100 epochs of COCO train2017 (118k images) at batch 64:
# 100 * 118000 / 64 = 184375 iterations; steps at 88.9 % and 96.3 % of it.
train.max_iter = 184375
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[163889, 177546],
        num_updates=train.max_iter,
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)

# AdamW with layer-wise lr decay 0.7 over the 12 blocks (parameter names
# backbone.net.blocks.{i}. match detectron2's ViT naming, so its decay rule applies as is).
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
optimizer.lr = 1e-4
optimizer.weight_decay = 0.1
