"""Build revvit models from the official SlowFast and mmpretrain configuration formats.

``build_from_slowfast_cfg`` reads the nested dict parsed from a SlowFast YAML (or a yacs
CfgNode), ``build_from_mmpretrain_cfg`` an mmpretrain ``model`` config dict. Both return the
revvit model with the architecture the config describes; weights come from
:func:`revvit_d2.load_pretrained` / the converters.
"""
import logging
from typing import Any, Mapping

from torch import nn

from .modeling.rev_mvit import RevMViT
from .modeling.rev_vit import RevViT

logger = logging.getLogger(__name__)

__all__ = ["build_from_slowfast_cfg", "build_from_mmpretrain_cfg"]

_MISSING = object()

# SlowFast defaults (slowfast/config/defaults.py) for the keys that the official Rev configs may
# leave out. Keys without a default here must be present in the given config.
_SLOWFAST_DEFAULTS = {
    "MVIT.MLP_RATIO": 4.0,
    "MVIT.QKV_BIAS": True,
    "MVIT.DROPOUT_RATE": 0.0,
    "MVIT.DROPPATH_RATE": 0.1,
    "MVIT.USE_ABS_POS": True,
    "MVIT.SEP_POS_EMBED": False,
    "MVIT.CLS_EMBED_ON": True,
    "MVIT.PATCH_2D": False,
    "MVIT.SEPARATE_QKV": False,
    "MVIT.USE_MEAN_POOLING": False,
    "MVIT.DIM_MUL": [],
    "MVIT.HEAD_MUL": [],
    "MVIT.POOL_Q_STRIDE": [],
    "MVIT.POOL_KV_STRIDE": [],
    "MVIT.POOL_KV_STRIDE_ADAPTIVE": None,
    "MVIT.POOL_KVQ_KERNEL": None,
    "MVIT.MODE": "conv",
    "MVIT.REV.ENABLE": False,
    "MVIT.REV.RESPATH_FUSE": "concat",
    "MVIT.REV.BUFFER_LAYERS": [],
    "MVIT.REV.RES_PATH": "conv",
    "MVIT.REV.PRE_Q_FUSION": "avg",
    "MODEL.DROPOUT_RATE": 0.5,
    "DATA.NUM_FRAMES": 8,
}


def _get(cfg: Mapping, dotted: str, default: Any = _MISSING):
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            if default is not _MISSING:
                return default
            if dotted in _SLOWFAST_DEFAULTS:
                return _SLOWFAST_DEFAULTS[dotted]
            raise KeyError(f"SlowFast config lacks {dotted}; pass the merged config "
                           f"(cfg.dump() of the official code, or an oracle file's 'config')")
    return node


def build_from_slowfast_cfg(cfg: Mapping, use_rev_backprop: bool = True, **overrides) -> nn.Module:
    """Build the model an official SlowFast config describes (``MODEL.MODEL_NAME: MViT`` with
    ``MVIT.REV.ENABLE: True``).

    A configuration without pooling, dimension multipliers and with a 2-D patch stem is a
    :class:`RevViT`; anything else is a :class:`RevMViT`. ``CLS_EMBED_ON: True`` (set by the
    shipped Kinetics YAML, which the official code itself rejects) is accepted with a warning and
    the class-token-free model that the released checkpoint needs is built.

    Args:
        cfg: nested dict of the YAML (or a yacs CfgNode).
        use_rev_backprop: False builds the same model with plain autograd.
        **overrides: constructor arguments to replace.
    """
    if not _get(cfg, "MVIT.REV.ENABLE"):
        raise ValueError("config has MVIT.REV.ENABLE False: not a reversible model")
    name = _get(cfg, "MODEL.MODEL_NAME", "MViT")
    if name != "MViT":
        raise ValueError(f"MODEL.MODEL_NAME is {name!r}; reversible models are 'MViT' configs")
    if _get(cfg, "MVIT.CLS_EMBED_ON"):
        logger.warning("MVIT.CLS_EMBED_ON is True, which the official reversible model rejects; "
                       "building the model without a class token (as the released checkpoints)")
    if not _get(cfg, "MVIT.USE_ABS_POS"):
        raise ValueError("MVIT.USE_ABS_POS False is not supported (no official Rev config uses it)")
    if _get(cfg, "MVIT.USE_MEAN_POOLING"):
        raise ValueError("MVIT.USE_MEAN_POOLING True is not supported (no official Rev config "
                         "uses it)")

    is_vit = (
        _get(cfg, "MVIT.PATCH_2D")
        and not _get(cfg, "MVIT.DIM_MUL")
        and not _get(cfg, "MVIT.POOL_Q_STRIDE")
        and not _get(cfg, "MVIT.POOL_KV_STRIDE_ADAPTIVE")
        and not _get(cfg, "MVIT.POOL_KV_STRIDE")
        and not _get(cfg, "MVIT.REV.BUFFER_LAYERS")
    )
    crop = int(_get(cfg, "DATA.TRAIN_CROP_SIZE"))
    common = dict(
        embed_dim=int(_get(cfg, "MVIT.EMBED_DIM")),
        depth=int(_get(cfg, "MVIT.DEPTH")),
        num_heads=int(_get(cfg, "MVIT.NUM_HEADS")),
        mlp_ratio=float(_get(cfg, "MVIT.MLP_RATIO")),
        qkv_bias=bool(_get(cfg, "MVIT.QKV_BIAS")),
        drop_path_rate=float(_get(cfg, "MVIT.DROPPATH_RATE")),
        dropout_rate=float(_get(cfg, "MVIT.DROPOUT_RATE")),
        head_dropout_rate=float(_get(cfg, "MODEL.DROPOUT_RATE")),
        num_classes=int(_get(cfg, "MODEL.NUM_CLASSES")),
        fuse=_get(cfg, "MVIT.REV.RESPATH_FUSE"),
        use_rev_backprop=use_rev_backprop,
    )
    if is_vit:
        kernel = list(_get(cfg, "MVIT.PATCH_KERNEL"))
        stride = list(_get(cfg, "MVIT.PATCH_STRIDE"))
        padding = list(_get(cfg, "MVIT.PATCH_PADDING"))
        if kernel != stride or kernel[0] != kernel[1] or any(padding):
            raise ValueError(f"Rev-ViT needs a square non-overlapping patch stem; got kernel "
                             f"{kernel}, stride {stride}, padding {padding}")
        kwargs = dict(common, img_size=crop, patch_size=kernel[0])
        kwargs.update(overrides)
        return RevViT(**kwargs)

    kwargs = dict(_rev_mvit_kwargs(cfg), **common)
    kwargs.update(overrides)
    return RevMViT(**kwargs)


def _rev_mvit_kwargs(cfg: Mapping) -> dict:
    """The :class:`RevMViT` architecture arguments of a SlowFast config (beyond those it shares
    with Rev-ViT)."""
    if _get(cfg, "MVIT.REV.RES_PATH") != "conv":
        raise ValueError("MVIT.REV.RES_PATH must be 'conv' (the official 'max' path is broken)")
    if _get(cfg, "MVIT.MODE") != "conv":
        raise ValueError(f"MVIT.MODE {_get(cfg, 'MVIT.MODE')!r} is not supported (only 'conv')")
    is_2d = bool(_get(cfg, "MVIT.PATCH_2D"))
    crop = int(_get(cfg, "DATA.TRAIN_CROP_SIZE"))
    frames = int(_get(cfg, "DATA.NUM_FRAMES"))
    return dict(
        input_size=(crop, crop) if is_2d else (frames, crop, crop),
        patch_kernel=tuple(_get(cfg, "MVIT.PATCH_KERNEL")),
        patch_stride=tuple(_get(cfg, "MVIT.PATCH_STRIDE")),
        patch_padding=tuple(_get(cfg, "MVIT.PATCH_PADDING")),
        dim_mul=[tuple(e) for e in _get(cfg, "MVIT.DIM_MUL")],
        head_mul=[tuple(e) for e in _get(cfg, "MVIT.HEAD_MUL")],
        pool_q_stride=[tuple(e) for e in _get(cfg, "MVIT.POOL_Q_STRIDE")],
        pool_kvq_kernel=_get(cfg, "MVIT.POOL_KVQ_KERNEL"),
        pool_kv_stride_adaptive=_get(cfg, "MVIT.POOL_KV_STRIDE_ADAPTIVE"),
        pool_kv_stride=[tuple(e) for e in _get(cfg, "MVIT.POOL_KV_STRIDE")],
        transition_layers=tuple(_get(cfg, "MVIT.REV.BUFFER_LAYERS")),
        pre_q_fusion=_get(cfg, "MVIT.REV.PRE_Q_FUSION"),
        sep_pos_embed=bool(_get(cfg, "MVIT.SEP_POS_EMBED")),
    )


_MMPRETRAIN_ARCHS = {
    # name: (embed_dims, num_layers, num_heads, feedforward_channels), from mmpretrain's arch_zoo
    "deit-small": (384, 12, 6, 1536), "deit-s": (384, 12, 6, 1536),
    "deit-base": (768, 12, 12, 3072), "deit-b": (768, 12, 12, 3072),
    "base": (768, 12, 12, 3072), "b": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096), "l": (1024, 24, 16, 4096),
    "deit-tiny": (192, 12, 3, 768), "deit-t": (192, 12, 3, 768),
    "small": (768, 8, 8, 2304), "s": (768, 8, 8, 2304),  # NOT Rev-ViT-S (that is deit-small)
    "huge": (1280, 32, 16, 5120), "h": (1280, 32, 16, 5120),
}


def build_from_mmpretrain_cfg(model_cfg: Mapping, use_rev_backprop: bool = True,
                              **overrides) -> nn.Module:
    """Build the RevViT an mmpretrain ``ImageClassifier`` config describes (backbone
    ``RevVisionTransformer``, head ``LinearClsHead``), returning logits like mmpretrain's
    ``model(x, mode='tensor')``."""
    backbone = model_cfg.get("backbone", model_cfg)
    if backbone.get("type", "RevVisionTransformer") != "RevVisionTransformer":
        raise ValueError(f"backbone type {backbone.get('type')!r} is not RevVisionTransformer")
    arch = backbone.get("arch", "deit-base")
    if isinstance(arch, str):
        if arch.lower() not in _MMPRETRAIN_ARCHS:
            raise ValueError(f"unknown mmpretrain RevViT arch {arch!r}")
        dims, layers, heads, ffn = _MMPRETRAIN_ARCHS[arch.lower()]
    else:
        dims, layers, heads, ffn = (arch[k] for k in
                                    ("embed_dims", "num_layers", "num_heads",
                                     "feedforward_channels"))
    if backbone.get("with_cls_token", False) or backbone.get("out_type", "avg_featmap") != \
            "avg_featmap":
        raise ValueError("only out_type='avg_featmap' without class token is supported "
                         "(as the mmpretrain RevViT configs)")
    if not backbone.get("final_norm", True):
        raise ValueError("final_norm=False is not supported (no RevViT config uses it)")
    eps = backbone.get("norm_cfg", {}).get("eps", 1e-6)
    if eps != 1e-6:
        raise ValueError(f"LayerNorm eps {eps} is not supported (RevViT uses 1e-6)")
    head = model_cfg.get("head") or {}
    kwargs = dict(
        img_size=backbone.get("img_size", 224),
        patch_size=backbone.get("patch_size", 16),
        in_chans=backbone.get("in_channels", 3),
        embed_dim=dims,
        depth=layers,
        num_heads=heads,
        mlp_ratio=ffn / dims,
        qkv_bias=backbone.get("qkv_bias", True),
        drop_path_rate=backbone.get("drop_path_rate", 0.0),
        dropout_rate=backbone.get("drop_rate", 0.0),
        num_classes=head.get("num_classes", 0),
        fuse=backbone.get("fusion_mode", "concat"),
        use_rev_backprop=use_rev_backprop,
    )
    kwargs.update(overrides)
    model = RevViT(**kwargs)
    if int(dims * kwargs["mlp_ratio"]) != ffn:
        raise ValueError(f"feedforward_channels {ffn} is not representable as a ratio of {dims}")
    return model
