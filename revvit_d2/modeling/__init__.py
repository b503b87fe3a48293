"""The core models: plain torch, explicit keyword arguments, no config objects.

Imports nothing of revvit outside this package (fvcore only inside ``flops``).
"""
from .base import RevModelBase
from .budget import choose_stored_blocks, estimate_stored_blocks_memory
from .layers import MultiScaleAttention, PatchEmbed, TwoStreamFusion, resize_pos_embed
from .options import EngineOptions
from .rev_mvit import RevMViT
from .rev_vit import RevViT
from .reversible import ReversibleBlock, RevBackProp, compile_subblocks, reversible_stack
from .sharding import shard_model
from .variants import build_model, get_model_kwargs, get_pretrained_cfg, list_models

__all__ = [
    "EngineOptions",
    "MultiScaleAttention",
    "PatchEmbed",
    "TwoStreamFusion",
    "resize_pos_embed",
    "ReversibleBlock",
    "RevBackProp",
    "RevModelBase",
    "compile_subblocks",
    "reversible_stack",
    "shard_model",
    "RevViT",
    "RevMViT",
    "build_model",
    "choose_stored_blocks",
    "estimate_stored_blocks_memory",
    "get_model_kwargs",
    "get_pretrained_cfg",
    "list_models",
]
