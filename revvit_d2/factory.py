"""``create_model``: a named variant, optionally with a checkpoint loaded strictly.

Joins the variant registry (:func:`revvit_d2.modeling.build_model`, no weights) and the strict
loader (:func:`revvit_d2.checkpoint.load_pretrained`).
"""
from torch import nn

from .checkpoint import load_pretrained
from .modeling.variants import build_model

__all__ = ["create_model"]


def create_model(name: str, checkpoint=None, *, allow_unsafe_pickle: bool = False,
                 **overrides) -> nn.Module:
    """Build a named variant, and load a checkpoint into it if one is given.

    Args:
        name: one of :func:`revvit_d2.list_models` (``rev_vit_s``, ``rev_vit_b``, ``rev_vit_l``,
            ``rev_mvit_b``, ``rev_mvit_b_16x4``, the tiny ``*_test`` sizes).
        checkpoint: optional path or dict of an official SlowFast / mmpretrain or revvit
            checkpoint, loaded strictly with :func:`revvit_d2.load_pretrained`.
        allow_unsafe_pickle: see :func:`revvit_d2.load_pretrained` (executes code from the
            file; only for files you trust).
        **overrides: constructor arguments replacing the variant's (``num_classes``,
            ``drop_path_rate``, ``img_size``, the engine options ``use_rev_backprop``,
            ``rev_anchor_every``...).
    """
    model = build_model(name, **overrides)
    if checkpoint is not None:
        load_pretrained(model, checkpoint, allow_unsafe_pickle=allow_unsafe_pickle)
    return model
