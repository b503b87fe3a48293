"""Built-in demo: the tiny Rev-MViT trained and tested on the synthetic motion dataset (CPU).

    python tools/run_video.py --config-file configs/Kinetics/rev_mvit_test_synthetic.py

The dataset (``$REVVIT_DATASETS/kinetics_synthetic``, 4 classes that differ only by motion:
move up, move down, grow, shrink; 2 s videos at 16 fps, 96x72) is generated on first use by
tools/run_video.py. Same pipeline as the official recipe (rev_mvit_b_16x4.py, whose objects this
file imports and adjusts): random clip + scale/aspect jitter + flip for training, uniform clips x
centre crop with softmax averaging for testing; only sizes and the schedule are smaller, and the
regularising pieces of the recipe (RandAugment, random erasing, repeated augmentation,
Mixup/CutMix) are off: repeated augmentation would double the iterations of this short run, and
the tests' small batches (2 clips over 2 processes) would not divide into 2 samples per video.
Turn them on with the keys of rev_mvit_b_16x4.py.
"""
import os

from detectron2.config import LazyCall as L

from revvit_video import rev_mvit_video_test

from .rev_mvit_b_16x4 import dataloader, lr_multiplier, optimizer, train

_SYNTHETIC = os.path.join(os.environ.get("REVVIT_DATASETS", "datasets"), "kinetics_synthetic")

# The oracle-sized tiny Rev-MViT (16 wide, 5 layers), 8 frames of 64x64, 4 classes.
model = L(rev_mvit_video_test)(temporal_size=8, head_num_classes=4)

# Arguments of revvit_d2.data.synthetic.kinetics.make_synthetic_kinetics for the built-in dataset.
dataloader.synthetic = dict(train_per_class=48, val_per_class=24)

# 8 frames at rate 2 of the 16 fps videos: a clip is 1 s of the 2 s video.
dataloader.train.data_path = os.path.join(_SYNTHETIC, "train.csv")
dataloader.train.num_frames = 8
dataloader.train.sampling_rate = 2
dataloader.train.target_fps = 16
dataloader.train.crop_size = 64
dataloader.train.total_batch_size = 16
dataloader.train.num_workers = 2
dataloader.train.rand_augment = None
dataloader.train.random_erasing = 0.0
dataloader.train.num_sample = 1

dataloader.test.data_path = os.path.join(_SYNTHETIC, "val.csv")
dataloader.test.num_frames = 8
dataloader.test.sampling_rate = 2
dataloader.test.target_fps = 16
dataloader.test.short_side = 64
dataloader.test.crop_size = 64
dataloader.test.batch_size = 20
dataloader.test.num_workers = 2

optimizer.lr = 2e-3
optimizer.weight_decay = 0.05

# 192 videos / 16 clips = 12 iterations per epoch; 8 epochs = 96 iterations, warm-up 1 epoch.
lr_multiplier.warmup_length = 1 / 8
train.epochs = 8
train.output_dir = "output/rev_mvit_test_synthetic"
train.label_smoothing = 0.0
train.mixup = None
train.checkpointer.period = None  # every epoch
train.checkpointer.max_to_keep = 2
train.log_period = 12
# One compute thread: the DataLoader workers decode on the other core. On 2 shared cores, two
# OpenMP threads competing with the decoders made a training step up to 20x slower.
train.num_threads = 1
