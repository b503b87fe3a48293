"""Built-in demo: the tiny Rev-ViT (64x64, 4 reversible blocks) trained on the synthetic shape
folder on the CPU, then tested (tools/train_imagenet.py runs it when given no argument).

    python tools/train_imagenet.py

The folder (``$REVVIT_DATASETS/imagenet_synthetic/{train,val}``, 10 shape classes, 200 + 200
images) is generated on first use. Same pipeline as the official recipes (rev_vit_s_train.py,
whose objects this file imports and adjusts: timm RandAugment, random erasing, Mixup / CutMix,
soft-target cross-entropy, AdamW, warm-up + cosine); only the sizes, the schedule and the
augmentation strength are smaller, for 200 training images.
"""
import os

from .rev_vit_s_train import dataloader, lr_multiplier, model, optimizer, train

_SYNTHETIC = os.path.join(os.environ.get("REVVIT_DATASETS", "datasets"), "imagenet_synthetic")

model.name = "rev_vit_test"
model.drop_path_rate = 0.0

dataloader.train.data = os.path.join(_SYNTHETIC, "train")
dataloader.train.total_batch_size = 20
dataloader.train.num_workers = 1
dataloader.train.augment.scale = (0.5, 1.0)  # the shapes must stay in the crop
dataloader.train.augment.auto_augment = "rand-m5-n1-mstd0.5-inc1"
dataloader.train.augment.re_prob = 0.1
dataloader.train.mixup.prob = 0.3
dataloader.test.data = os.path.join(_SYNTHETIC, "val")
dataloader.test.batch_size = 50
dataloader.test.num_workers = 1

optimizer.lr = 2e-3

# 200 images / 20 = 10 iterations per epoch; 30 epochs = 300 iterations, warm-up 2 epochs.
lr_multiplier.warmup_length = 2 / 30
lr_multiplier.warmup_factor = 0.01
lr_multiplier.scheduler.end_value = 0.01
train.epochs = 30
train.output_dir = "output/rev_vit_test_imagenet"
train.clip_grad_l2norm = 1.0
train.checkpointer.period = None  # every epoch
train.checkpointer.max_to_keep = 2
train.eval_period = 150
train.log_period = 10
train.device = "cpu"
train.num_threads = 1
