"""Rev-MViT-B on ImageNet-1k: the official REV_MVIT_B_16_CONV recipe (SlowFast projects/rev),
82.9 top-1.

    python tools/train_imagenet.py --config-file configs/ImageNet/rev_mvit_b_train.py --num-gpus 8

Same pipeline as rev_vit_s_train.py (whose objects this file imports); what REV_MVIT_B_16_CONV.yaml
changes, official value / here:

==========================  ========================  ==========================================
SlowFast key                official                  here
==========================  ========================  ==========================================
MODEL                       Rev-MViT-B, 16 layers     model.name rev_mvit_b
MVIT.DROPPATH_RATE          0.1                       model.drop_path_rate
TRAIN.BATCH_SIZE            256 (8 GPUs)              dataloader.train.total_batch_size
SOLVER.BASE_LR              2.5e-4                    optimizer.lr (and the scheduler factors)
SOLVER.WEIGHT_DECAY         0.05                      optimizer.weight_decay
SOLVER.CLIP_GRAD_L2NORM     1.0                       train.clip_grad_l2norm
AUG.AA_TYPE                 rand-m9-n6-mstd0.5-inc1   dataloader.train.augment.auto_augment
==========================  ========================  ==========================================

Unchanged: AdamW, 70 warm-up of 300 epochs from 1e-8, cosine to 1e-6, Mixup 0.8 / CutMix 1.0 /
prob 1.0 / switch 0.5 / smoothing 0.1, random erasing 0.25 pixel.
"""
from .rev_vit_s_train import dataloader, lr_multiplier, model, optimizer, train

model.name = "rev_mvit_b"
model.drop_path_rate = 0.1
dataloader.train.total_batch_size = 256
dataloader.train.augment.auto_augment = "rand-m9-n6-mstd0.5-inc1"
optimizer.lr = 2.5e-4
optimizer.weight_decay = 0.05
# warm-up from 1e-8 and cosine down to 1e-6, as factors of the base LR 2.5e-4
lr_multiplier.warmup_factor = 1e-8 / 2.5e-4
lr_multiplier.scheduler.end_value = 1e-6 / 2.5e-4
train.clip_grad_l2norm = 1.0
train.output_dir = "output/rev_mvit_b_imagenet"
