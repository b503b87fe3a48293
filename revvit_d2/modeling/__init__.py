"""The core models: plain torch, explicit keyword arguments, no config objects."""
from .layers import MultiScaleAttention, PatchEmbed, TwoStreamFusion, resize_pos_embed
from .reversible import ReversibleBlock, RevBackProp, reversible_stack
from .rev_vit import RevViT
from .variants import create_model, get_pretrained_cfg, list_models

__all__ = [
    "MultiScaleAttention",
    "PatchEmbed",
    "TwoStreamFusion",
    "resize_pos_embed",
    "ReversibleBlock",
    "RevBackProp",
    "reversible_stack",
    "RevViT",
    "create_model",
    "get_pretrained_cfg",
    "list_models",
]
