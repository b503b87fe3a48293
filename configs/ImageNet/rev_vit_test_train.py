"""Built-in demo: the tiny Rev-ViT (64x64 input, 8x8 patches, 4 reversible blocks) trained on a
generated shape folder on the CPU, then tested (tools/train_imagenet.py runs it when given no
argument).

    python tools/train_imagenet.py

The folder (``$REVVIT_DATASETS/imagenet_synthetic_train/{train,val}``: 10 shape classes, 100
training and 20 test images each, random colours, positions and sizes) is generated on first use
from ``dataloader.synthetic``. Same pipeline as the official recipes (rev_vit_s_train.py, whose
objects this file imports and adjusts: timm's training transform, AdamW, warm-up + cosine,
gradient clipping), smaller. RandAugment, random erasing and Mixup / CutMix are off here: they
regularise long runs, and in a few CPU minutes on 1,000 images they slowed learning (measured on
2 CPU cores: 30.0 % top-1 after 1,860 steps with them, 31.5 % after 1,240 without;
docs/imagenet_train.md). tests/test_train_imagenet.py trains with all of them on.
"""
import os

from .rev_vit_s_train import dataloader, lr_multiplier, model, optimizer, train

_SYNTHETIC = os.path.join(os.environ.get("REVVIT_DATASETS", "datasets"),
                          "imagenet_synthetic_train")

model.name = "rev_vit_test"
model.patch_size = 8  # 8x8 tokens: 4x4 tokens of 16 pixels learn the shapes far more slowly
model.drop_path_rate = 0.0

# Arguments of revvit_d2.data.synthetic.imagenet.make_synthetic_imagefolder.
dataloader.synthetic = dict(root=_SYNTHETIC, train_per_class=100, val_per_class=20,
                            image_size=(48, 80))
dataloader.train.data = os.path.join(_SYNTHETIC, "train")
dataloader.train.total_batch_size = 32
dataloader.train.num_workers = 1
dataloader.train.augment.scale = (0.35, 1.0)  # the shapes must stay in the crop
dataloader.train.augment.auto_augment = None
dataloader.train.augment.color_jitter = 0.0  # colours are random already
dataloader.train.augment.re_prob = 0.0
dataloader.train.mixup.mixup_alpha = 0.0  # off: plain labels, cross-entropy
dataloader.train.mixup.cutmix_alpha = 0.0
dataloader.test.data = os.path.join(_SYNTHETIC, "val")
dataloader.test.batch_size = 50
dataloader.test.num_workers = 1

optimizer.lr = 2e-3

# 1,000 images / 32 = 31 iterations per epoch; 40 epochs = 1,240 iterations, warm-up 2 epochs.
lr_multiplier.warmup_length = 2 / 40
lr_multiplier.warmup_factor = 0.01
lr_multiplier.scheduler.end_value = 0.01
train.epochs = 40
train.output_dir = "output/rev_vit_test_imagenet"
train.label_smoothing = 0.0
train.clip_grad_l2norm = 1.0
train.checkpointer.period = 310  # every 10 epochs
train.checkpointer.max_to_keep = 2
train.eval_period = 620  # half way
train.log_period = 62
train.device = "cpu"
train.num_threads = 1  # the data-loader worker makes the images on the other core
