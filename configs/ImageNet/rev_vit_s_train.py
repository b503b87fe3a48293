"""Rev-ViT-S on ImageNet-1k: the official REV_VIT_S recipe (SlowFast projects/rev), 79.9 top-1.

    python tools/train_imagenet.py --config-file configs/ImageNet/rev_vit_s_train.py --num-gpus 8

Data: ``$REVVIT_DATASETS/imagenet/{train,val}/<wnid>/*.JPEG`` (``REVVIT_DATASETS`` defaults to
``./datasets``); override with ``dataloader.train.data=...`` / ``dataloader.test.data=...``.

The official yaml (configs/ImageNet/REV_VIT_S.yaml, merged with SlowFast's defaults) and here:

==========================  ===============================  ==================================
SlowFast key                official value                   here
==========================  ===============================  ==================================
TRAIN.BATCH_SIZE            512 (8 GPUs, 1 machine)          dataloader.train.total_batch_size
SOLVER.OPTIMIZING_METHOD    adamw, betas (0.9, 0.999)        optimizer (torch AdamW)
SOLVER.BASE_LR              5e-4                             optimizer.lr
SOLVER.WEIGHT_DECAY         0.05; 1-D params 0 (ZERO_WD_1D)  optimizer.weight_decay; norm/bias 0
SOLVER.WARMUP_EPOCHS        70, from WARMUP_START_LR 1e-8    lr_multiplier warmup 70/300, 2e-5
SOLVER.LR_POLICY            cosine after warm-up to 1e-6     CosineParamScheduler(1, 2e-3)
SOLVER.MAX_EPOCH            300                              train.epochs
SOLVER.CLIP_GRAD_L2NORM     1.0                              train.clip_grad_l2norm
MVIT.DROPPATH_RATE          0.1                              model.drop_path_rate
AUG.AA_TYPE                 rand-m7-mstd0.5-inc1             augment.auto_augment
AUG.INTERPOLATION           bicubic                          augment.interpolation
AUG.RE_PROB / MODE / COUNT  0.25 / pixel / 1                 augment.re_prob / re_mode / re_count
AUG.COLOR_JITTER            0.4 (unused with RandAugment)    augment.color_jitter
crop                        RandomResizedCrop 0.08-1, 3/4-4/3  augment.scale / ratio, hflip 0.5
MIXUP.ALPHA / CUTMIX_ALPHA  0.8 / 1.0                        mixup.mixup_alpha / cutmix_alpha
MIXUP.PROB / SWITCH_PROB    1.0 / 0.5                        mixup.prob / switch_prob
MIXUP.LABEL_SMOOTH_VALUE    0.1 (on the mixed targets)       mixup.label_smoothing
loss                        soft_cross_entropy               timm SoftTargetCrossEntropy
layer-wise LR decay         none in the recipe               none
test                        resize 256 bicubic, crop 224     model.pretrained_cfg (crop_pct .875)
==========================  ===============================  ==================================
"""
import os

import torch
from fvcore.common.param_scheduler import CosineParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params

from revvit_d2 import create_model

_IMAGENET = os.path.join(os.environ.get("REVVIT_DATASETS", "datasets"), "imagenet")

model = L(create_model)(name="rev_vit_s", drop_path_rate=0.1)

dataloader = dict(
    train=dict(
        data=os.path.join(_IMAGENET, "train"),  # ImageFolder: <data>/<class>/<image>
        total_batch_size=512,  # all processes together
        num_workers=8,  # per process
        # timm create_transform(is_training=True, ...): revvit_d2.data.imagefolder_train
        augment=dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, color_jitter=0.4,
                     auto_augment="rand-m7-mstd0.5-inc1", interpolation="bicubic",
                     re_prob=0.25, re_mode="pixel", re_count=1),
        # timm Mixup; mixup_alpha=0 and cutmix_alpha=0 turn it off (then hard labels)
        mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                   label_smoothing=0.1),
    ),
    test=dict(
        data=os.path.join(_IMAGENET, "val"),
        batch_size=64,  # per process
        num_workers=8,
        max_images=None,  # an evenly spaced subset of this many images
    ),
)

# AdamW; norms and biases (all 1-D parameters) get no weight decay, position embeddings do
# (SOLVER.ZERO_WD_1D_PARAM True, ZERO_DECAY_POS_CLS False).
optimizer = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0, weight_decay_bias=0.0),
    lr=5e-4,
    betas=(0.9, 0.999),
    weight_decay=0.05,
)

# Per iteration: linear warm-up over 70 of 300 epochs from 1e-8 (factor 2e-5 of 5e-4), then a
# half cosine over the remaining 230 epochs down to 1e-6 (factor 2e-3; COSINE_AFTER_WARMUP).
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=1e-6 / 5e-4),
    warmup_length=70 / 300,
    warmup_factor=1e-8 / 5e-4,
    rescale_interval=True,
)

# 300 epochs of 1,281,167 images / 512 = 2,502 iterations -> 750,600 iterations.
train = dict(
    output_dir="output/rev_vit_s_imagenet",
    epochs=300,
    max_iter=None,  # set to override epochs
    init_checkpoint=None,  # official .pyth, mmpretrain, revvit or plain ViT (timm/DeiT/MAE)
    finetune=False,  # True: the checkpoint's head is not loaded (a new one for other classes)
    label_smoothing=0.1,  # used only when Mixup is off (Mixup smooths its own targets)
    clip_grad_l2norm=1.0,
    amp=dict(enabled=False, dtype="float16"),  # the official runs used fp32; CUDA only
    checkpointer=dict(period=None, max_to_keep=5),  # period in iterations; None = every epoch
    eval_period=None,  # iterations between tests during training; None = only at the end
    log_period=20,
    seed=0,
    device="auto",  # cuda when available
    num_threads=None,  # torch intra-op threads per process (None: torch's default)
)
