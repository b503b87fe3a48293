"""Built-in demo: the tiny Rev-ViT (64x64 input, 10 classes) on the synthetic shape folder.

``eval.data`` is ``$REVVIT_DATASETS/imagenet_synthetic/val`` (``REVVIT_DATASETS`` defaults to
``./datasets``); tools/eval_imagenet.py generates that folder on first use. Without a checkpoint
the weights are random, so accuracy is at chance level (10 % top-1, 50 % top-5).
"""
import os

from detectron2.config import LazyCall as L

from revvit_d2 import create_model

_DATASETS = os.environ.get("REVVIT_DATASETS", "datasets")

model = L(create_model)(name="rev_vit_test")

eval = dict(
    data=os.path.join(_DATASETS, "imagenet_synthetic", "val"),  # ImageFolder: <data>/<class>/*.JPEG
    checkpoint=None,  # SlowFast .pyth, mmpretrain .pth or revvit checkpoint
    batch_size=50,
    num_workers=2,
    max_images=None,  # evaluate an evenly spaced subset of this many images
    log_period=2,  # batches between progress lines (when not on a terminal)
)
