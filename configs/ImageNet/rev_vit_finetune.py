"""Fine-tune Rev-ViT-B on your own ImageFolder with another number of classes: a new head on
an official checkpoint or on plain ViT weights (timm / DeiT / MAE, detected automatically).

    # from the official Rev-ViT-B checkpoint (SlowFast REV_VIT_B.pyth, 1000 classes)
    python tools/train_imagenet.py --config-file configs/ImageNet/rev_vit_finetune.py \
        --num-gpus 8 train.init_checkpoint=REV_VIT_B.pyth model.num_classes=37 \
        dataloader.train.data=/data/pets/train dataloader.test.data=/data/pets/val
    # from a timm / DeiT / MAE ViT-B/16 state dict, rewired Re^2TAL-style (docs/vit_import.md)
    python tools/train_imagenet.py --config-file configs/ImageNet/rev_vit_finetune.py \
        --num-gpus 8 train.init_checkpoint=vit_b16.pth model.rewire=re2tal model.num_classes=37 \
        dataloader.train.data=/data/pets/train dataloader.test.data=/data/pets/val

``train.finetune=True`` is what allows the head to differ: the checkpoint's ``head.*`` is not
loaded (one log line says how many tensors were loaded and that the head is new); every other
tensor must fit, strictly. Without it, a checkpoint with another class count is one ``error:``
line. ``model.rewire=re2tal`` builds the mean-of-streams fusion under which a plain ViT's final
norm applies unchanged; ``None`` (the default) is the official Rev-ViT fusion, for official and
revvit checkpoints. ``model.num_classes`` must be at least the number of class folders.

The schedule is a short fine-tuning one (not an official recipe): 30 epochs, batch 128,
AdamW 1e-4 with 3 warm-up epochs and a cosine to 1e-6, drop path 0.1; the augmentation and
Mixup / CutMix are the official Rev-ViT-B ones (rev_vit_b_train.py, imported here).
"""
import os

from detectron2.config import LazyCall as L

from revvit_d2 import create_model

from .rev_vit_b_train import dataloader, lr_multiplier, optimizer, train

_DATA = os.path.join(os.environ.get("REVVIT_DATASETS", "datasets"), "my_imagefolder")

model = L(create_model)(name="rev_vit_b", num_classes=100, drop_path_rate=0.1, rewire=None)

dataloader.train.data = os.path.join(_DATA, "train")
dataloader.train.total_batch_size = 128
dataloader.test.data = os.path.join(_DATA, "val")

optimizer.lr = 1e-4
lr_multiplier.warmup_length = 3 / 30
lr_multiplier.warmup_factor = 0.01
lr_multiplier.scheduler.end_value = 0.01
train.epochs = 30
train.init_checkpoint = None  # REV_VIT_B.pyth, a revvit checkpoint, or timm / DeiT / MAE weights
train.finetune = True
train.output_dir = "output/rev_vit_finetune"
