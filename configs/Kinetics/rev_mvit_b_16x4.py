"""Rev-MViT-B 16x4 on Kinetics-400: the official REV_MVIT_B_16x4_CONV recipe (SlowFast).

Official result: 78.4 top-1 / 93.4 top-5, 5 clips x 1 crop (projects/rev in SlowFast).

    # test the official checkpoint
    python tools/run_video.py --config-file configs/Kinetics/rev_mvit_b_16x4.py --eval-only \
        train.init_checkpoint=REV_MVIT_B_16x4.pyth
    # train (8 GPUs per machine; the official run used 16 machines x 8 GPUs)
    python tools/run_video.py --config-file configs/Kinetics/rev_mvit_b_16x4.py --num-gpus 8

Data: ``$REVVIT_DATASETS/kinetics400/{train,val}.csv`` (``REVVIT_DATASETS`` defaults to
``./datasets``), one ``<path> <label>`` line per video, paths relative to the list's folder (or
absolute); override with ``dataloader.train.data_path=...`` / ``dataloader.test.data_path=...``.

The whole official training recipe is set (docs/video.md, "The official training recipe"):
RandAugment rand-m7-n4-mstd0.5-inc1, random erasing 0.25, repeated augmentation (AUG.NUM_SAMPLE
2), Mixup 0.8 / CutMix 1.0 (switch 0.5) with label smoothing 0.1 on the mixed targets; each
piece is turned off by its key (``dataloader.train.rand_augment=None``, ``.random_erasing=0``,
``.num_sample=1``, ``train.mixup=None``).

Differences from the official recipe, from the libraries used (revvit_video/augment.py):
RandAugment is pytorchvideo's video RandAugment, whose op table is the increasing-severity one
(inc1) but has 14 ops (no SolarizeAdd), draws the 4 ops of a clip without replacement
(SlowFast's timm copy: with replacement) and interpolates geometric ops bilinearly on float
pixels (SlowFast: bicubic on 8-bit PIL frames); random erasing is timm's (10 tries to place the
box, SlowFast's cube variant 100), one box for all frames as in SlowFast; Mixup / CutMix are
pytorchvideo's (the same Beta draws, CutMix weight corrected to the pasted box, as timm's).
Fine-tuning from the released weights or testing them is unaffected.
"""
import os

import torch
from fvcore.common.param_scheduler import CosineParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params

from revvit_video import rev_mvit_b_16x4
from revvit_video.data import build_kinetics_test_loader, build_kinetics_train_loader

_K400 = os.path.join(os.environ.get("REVVIT_DATASETS", "datasets"), "kinetics400")

model = L(rev_mvit_b_16x4)(pretrained=False, checkpoint=None)

# 16 frames at sampling rate 4: a clip spans 64 frames at 30 fps (2.13 s), whatever the video's
# own frame rate. Keep num_frames / sampling_rate / target_fps equal in train and test.
dataloader = dict(
    train=L(build_kinetics_train_loader)(
        data_path=os.path.join(_K400, "train.csv"),
        num_frames=16, sampling_rate=4, target_fps=30,
        crop_size=224,
        jitter_scales_relative=(0.08, 1.0),  # RandomResizedCrop area
        jitter_aspect_relative=(0.75, 1.3333),
        hflip_prob=0.5,
        mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225),  # 0-1 scale
        rand_augment="rand-m7-n4-mstd0.5-inc1",  # AUG.AA_TYPE; None = off
        random_erasing=0.25,  # AUG.RE_PROB (pixel mode, one box); 0 = off
        num_sample=2,  # AUG.NUM_SAMPLE: 2 differently augmented clips per video; 1 = off
        # Official: TRAIN.BATCH_SIZE 16 videos per machine x 16 machines = 256 videos per
        # iteration, x NUM_SAMPLE 2 = 512 clips (total_batch_size counts clips).
        total_batch_size=512,
        num_workers=8,
        seed=0,
    ),
    test=L(build_kinetics_test_loader)(
        data_path=os.path.join(_K400, "val.csv"),
        num_frames=16, sampling_rate=4, target_fps=30,
        num_clips=5, num_crops=1,  # 5 uniform temporal clips x 1 centre crop
        short_side=224, crop_size=224,
        mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225),
        batch_size=8,  # views per process
        num_workers=8,
    ),
)

# AdamW; norms and biases (all 1-D parameters) get no weight decay, position embeddings do
# (SOLVER.ZERO_WD_1D_PARAM True, ZERO_DECAY_POS_CLS False). BASE_LR 1e-4 x 16 machines.
optimizer = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0, weight_decay_bias=0.0),
    lr=1.6e-3,
    betas=(0.9, 0.999),
    weight_decay=0.07,
)

# Per-iteration schedule: linear warm-up over 50 of 200 epochs from 1.6e-5 (factor 0.01) to
# 1.6e-3, then a half cosine over the remaining 150 epochs down to 1.6e-5
# (COSINE_AFTER_WARMUP: the cosine starts where the warm-up ends).
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.01),
    warmup_length=50 / 200,
    warmup_factor=0.01,
    rescale_interval=True,
)

# 200 epochs; an epoch is floor(ceil(N / processes) / videos per process) iterations, e.g.
# 240,000 videos / 256 videos (512 clips) = 937 iterations -> 187,400 iterations in all.
train = dict(
    output_dir="output/rev_mvit_b_16x4",
    epochs=200,
    max_iter=None,  # set to override epochs
    init_checkpoint=None,  # official .pyth, revvit_d2 or revvit_video checkpoint
    init_skip_head=False,  # True: keep a new head (fine-tuning to other classes)
    label_smoothing=0.1,  # of the hard labels: used only with train.mixup=None
    # MIXUP section: Mixup / CutMix of each batch, soft targets smoothed by label_smoothing;
    # None = off.
    mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
               label_smoothing=0.1),
    clip_grad_l2norm=None,
    amp=dict(enabled=False, dtype="float16"),  # the official run used fp32; CUDA only
    checkpointer=dict(period=None, max_to_keep=5),  # period in iterations; None = every epoch
    eval_period=None,  # iterations between tests during training; None = only at the end
    log_period=20,
    seed=0,
    device="auto",  # cuda when available
    num_threads=None,  # torch intra-op threads per process (None: torch's default)
)
