"""Rev-ViT-B on ImageNet-1k: the official REV_VIT_B recipe (SlowFast projects/rev), 81.8 top-1.

    python tools/train_imagenet.py --config-file configs/ImageNet/rev_vit_b_train.py --num-gpus 8

Same pipeline as rev_vit_s_train.py (whose objects this file imports); what REV_VIT_B.yaml
changes, official value / here:

==========================  ========================  ==========================================
SlowFast key                official                  here
==========================  ========================  ==========================================
MVIT.EMBED_DIM / NUM_HEADS  768 / 12                  model.name rev_vit_b
MVIT.DROPPATH_RATE          0.2                       model.drop_path_rate
SOLVER.WEIGHT_DECAY         0.1                       optimizer.weight_decay
SOLVER.CLIP_GRAD_L2NORM     2.0                       train.clip_grad_l2norm
AUG.AA_TYPE                 rand-m6-n5-mstd0.5-inc1   dataloader.train.augment.auto_augment
==========================  ========================  ==========================================

Unchanged: batch 512, AdamW lr 5e-4, 70 warm-up of 300 epochs from 1e-8, cosine to 1e-6,
Mixup 0.8 / CutMix 1.0 / prob 1.0 / switch 0.5 / smoothing 0.1, random erasing 0.25 pixel.
"""
from .rev_vit_s_train import dataloader, lr_multiplier, model, optimizer, train

model.name = "rev_vit_b"
model.drop_path_rate = 0.2
optimizer.weight_decay = 0.1
dataloader.train.augment.auto_augment = "rand-m6-n5-mstd0.5-inc1"
train.clip_grad_l2norm = 2.0
train.output_dir = "output/rev_vit_b_imagenet"
