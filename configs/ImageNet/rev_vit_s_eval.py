"""Rev-ViT-S (official REV_VIT_S, 79.9 % top-1) on ImageNet-1k val, single 224 centre crop.

Same as rev_vit_b_eval.py with the S model and checkpoint: expects
``$REVVIT_DATASETS/imagenet/val/<wnid>/*.JPEG`` and ``REV_VIT_S.pyth`` in the current directory;
override with ``eval.data=...`` / ``eval.checkpoint=...`` (or ``--checkpoint``).
"""
from .rev_vit_b_eval import eval, model  # noqa: F401  (LazyConfig exports)

model.name = "rev_vit_s"
eval.checkpoint = "REV_VIT_S.pyth"
