"""Rev-ViT-B (official REV_VIT_B, 81.8 % top-1) on ImageNet-1k val, single 224 centre crop.

Expects ``$REVVIT_DATASETS/imagenet/val/<wnid>/*.JPEG`` (``REVVIT_DATASETS`` defaults to
``./datasets``) and the official SlowFast checkpoint ``REV_VIT_B.pyth`` in the current
directory; override with ``eval.data=...`` / ``eval.checkpoint=...`` (or ``--checkpoint``).
"""
import os

from detectron2.config import LazyCall as L

from revvit_d2 import create_model

_DATASETS = os.environ.get("REVVIT_DATASETS", "datasets")

model = L(create_model)(name="rev_vit_b")

eval = dict(
    data=os.path.join(_DATASETS, "imagenet", "val"),
    checkpoint="REV_VIT_B.pyth",
    batch_size=64,
    num_workers=8,
    max_images=None,
    log_period=50,
)
