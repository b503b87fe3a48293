"""Named model variants with pinned dimensions and their metadata, and ``build_model``.

Each variant records the keyword arguments of its class and a ``pretrained_cfg`` (timm style)
that the tools read: input size, normalisation mean/std *with their scale*, crop fraction,
interpolation, and the official checkpoint file name. This registry is the one source of each
variant's dimensions (the video hub derives its defaults from it).

``build_model`` gives a model with its initial weights; ``revvit_d2.create_model`` (in
:mod:`revvit_d2.factory`) also loads a checkpoint.
"""
import copy
from typing import Any, Callable, Dict

from torch import nn

from .rev_mvit import RevMViT
from .rev_vit import RevViT

__all__ = [
    "build_model", "list_models", "get_pretrained_cfg", "get_model_kwargs", "get_model_class",
    "register_variant",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # on the 0-1 scale (after dividing by 255)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)

_IMAGENET_EVAL = dict(
    input_size=(3, 224, 224),
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    value_scale="0-1",
    crop_pct=0.875,  # resize the short side to 256, centre-crop 224 (official test pipeline)
    interpolation="bicubic",
    num_classes=1000,
)

_VARIANTS: Dict[str, Dict[str, Any]] = {}


def register_variant(name: str, cls: Callable[..., nn.Module], kwargs: Dict[str, Any],
                     pretrained_cfg: Dict[str, Any]):
    _VARIANTS[name] = dict(cls=cls, kwargs=kwargs, pretrained_cfg=pretrained_cfg)


# Official REV_VIT_S / REV_VIT_B (SlowFast configs/ImageNet); drop path is the official
# training value. There is no official Rev-ViT-L config: 1024 wide, 24 blocks, 16 heads as in the
# paper, drop path 0.2 is our choice (as ViT-B's).
register_variant(
    "rev_vit_s", RevViT,
    dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, drop_path_rate=0.1),
    dict(_IMAGENET_EVAL, checkpoint="REV_VIT_S.pyth", top1=79.9),
)
register_variant(
    "rev_vit_b", RevViT,
    dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, drop_path_rate=0.2),
    dict(_IMAGENET_EVAL, checkpoint="REV_VIT_B.pyth", top1=81.8),
)
register_variant(
    "rev_vit_l", RevViT,
    dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, drop_path_rate=0.2),
    dict(_IMAGENET_EVAL, checkpoint=None),
)
# NOT official (no config, no checkpoint): a ViT-H/16-sized Rev-ViT, 1280 wide, 32 blocks, 16
# heads, for the sharded-training memory measurements (benchmarks/fsdp_memory.py).
register_variant(
    "rev_vit_h", RevViT,
    dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0, drop_path_rate=0.2),
    dict(_IMAGENET_EVAL, checkpoint=None),
)
# Tiny variant for tests and the built-in demo (same shape as the oracle's tiny Rev-ViT).
register_variant(
    "rev_vit_test", RevViT,
    dict(img_size=64, embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0, num_classes=10),
    dict(_IMAGENET_EVAL, input_size=(3, 64, 64), num_classes=10, checkpoint=None),
)


_MVIT_B_SCHEDULE = dict(
    embed_dim=96, depth=16, num_heads=1, mlp_ratio=4.0,
    dim_mul=((1, 2.0), (3, 2.0), (14, 2.0)), head_mul=((1, 2.0), (3, 2.0), (14, 2.0)),
    pool_q_stride=((1, 1, 2, 2), (3, 1, 2, 2), (14, 1, 2, 2)), transition_layers=(1, 3, 14),
)
# Official REV_MVIT_B_16_CONV (ImageNet-1k).
register_variant(
    "rev_mvit_b", RevMViT,
    dict(_MVIT_B_SCHEDULE, input_size=(224, 224), patch_kernel=(7, 7), patch_stride=(4, 4),
         patch_padding=(3, 3), qkv_bias=True, pool_kvq_kernel=(1, 3, 3),
         pool_kv_stride_adaptive=(1, 4, 4), pre_q_fusion="concat_linear_2",
         sep_pos_embed=False, drop_path_rate=0.1, num_classes=1000),
    dict(_IMAGENET_EVAL, checkpoint="REV_MVIT_B.pyth", top1=82.9),
)
# Official REV_MVIT_B_16x4_CONV (Kinetics-400): 16 frames at sampling rate 4.
_KINETICS_EVAL = dict(
    input_size=(3, 16, 224, 224), num_frames=16, sampling_rate=4, mean=KINETICS_MEAN,
    std=KINETICS_STD, value_scale="0-1", test_short_side=224, test_crop=224,
    train_jitter_scales_relative=(0.08, 1.0), train_jitter_aspect_relative=(0.75, 1.3333),
    test_num_clips=5, test_num_crops=1, num_classes=400,
)
register_variant(
    "rev_mvit_b_16x4", RevMViT,
    dict(_MVIT_B_SCHEDULE, input_size=(16, 224, 224), patch_kernel=(3, 7, 7),
         patch_stride=(2, 4, 4), patch_padding=(1, 3, 3), qkv_bias=False,
         pool_kvq_kernel=(3, 3, 3), pool_kv_stride_adaptive=(1, 8, 8), pre_q_fusion="avg",
         sep_pos_embed=True, drop_path_rate=0.05, head_dropout_rate=0.5, num_classes=400),
    dict(_KINETICS_EVAL, checkpoint="REV_MVIT_B_16x4.pyth", top1=78.4, top5=93.4),
)
# Tiny Rev-MViTs of the oracle files' shape (tests, demos): 5 layers, transitions at 1 and 3.
_MVIT_TEST_SCHEDULE = dict(
    embed_dim=16, depth=5, num_heads=1, mlp_ratio=4.0,
    dim_mul=((1, 2.0), (3, 2.0)), head_mul=((1, 2.0), (3, 2.0)),
    pool_q_stride=((1, 1, 2, 2), (3, 1, 2, 2)), transition_layers=(1, 3), num_classes=10,
)
register_variant(
    "rev_mvit_test", RevMViT,
    dict(_MVIT_TEST_SCHEDULE, input_size=(64, 64), patch_kernel=(7, 7), patch_stride=(4, 4),
         patch_padding=(3, 3), pool_kvq_kernel=(1, 3, 3), pool_kv_stride_adaptive=(1, 4, 4),
         pre_q_fusion="concat_linear_2"),
    dict(_IMAGENET_EVAL, input_size=(3, 64, 64), num_classes=10, checkpoint=None),
)
register_variant(
    "rev_mvit_video_test", RevMViT,
    dict(_MVIT_TEST_SCHEDULE, input_size=(4, 64, 64), patch_kernel=(3, 7, 7),
         patch_stride=(2, 4, 4), patch_padding=(1, 3, 3), qkv_bias=False,
         pool_kvq_kernel=(3, 3, 3), pool_kv_stride_adaptive=(1, 4, 4), pre_q_fusion="avg",
         sep_pos_embed=True),
    dict(_KINETICS_EVAL, input_size=(3, 4, 64, 64), num_frames=4, test_short_side=64,
         test_crop=64, num_classes=10, checkpoint=None),
)


def list_models():
    """Names accepted by :func:`build_model` (and ``revvit_d2.create_model``)."""
    return sorted(_VARIANTS)


def _variant(name: str) -> Dict[str, Any]:
    if name not in _VARIANTS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _VARIANTS[name]


def get_pretrained_cfg(name: str) -> Dict[str, Any]:
    """Metadata of a variant (input size, mean/std and their scale, crop, interpolation...)."""
    return copy.deepcopy(_variant(name)["pretrained_cfg"])


def get_model_kwargs(name: str) -> Dict[str, Any]:
    """The constructor arguments a variant pins (a copy)."""
    return copy.deepcopy(_variant(name)["kwargs"])


def get_model_class(name: str) -> Callable[..., nn.Module]:
    """The class a variant builds (``RevViT`` or ``RevMViT``)."""
    return _variant(name)["cls"]


def build_model(name: str, **overrides) -> nn.Module:
    """Build a named variant with its initial weights (no checkpoint).

    Args:
        name: one of :func:`list_models` (``rev_vit_s``, ``rev_vit_b``, ``rev_vit_l``, ...).
        **overrides: constructor arguments replacing the variant's (``num_classes``,
            ``use_rev_backprop``, ``drop_path_rate``, ``img_size``...).
    """
    spec = _variant(name)
    model = spec["cls"](**dict(spec["kwargs"], **overrides))
    model.pretrained_cfg = get_pretrained_cfg(name)
    return model
