"""The yacs (``CfgNode``) path: ``add_revvit_config(cfg)`` and backbones registered in
detectron2's ``BACKBONE_REGISTRY``.

    cfg = get_cfg(); add_revvit_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_revvit_sfp_backbone"   # or "build_revmvit_fpn_backbone"
    cfg.MODEL.REVVIT.VARIANT = "rev_vit_b"

Both builders construct the same classes as the LazyConfig files (``configs/COCO``).
"""
import dataclasses

from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN

from ..modeling.options import EngineOptions
from ..modeling.variants import get_model_kwargs
from .backbone import (HybridStem, LastLevelMaxPool, RevMViTBackbone, RevSimpleFeaturePyramid,
                       RevViTBackbone)

__all__ = ["add_revvit_config", "build_revvit_sfp_backbone", "build_revmvit_fpn_backbone"]

_VIT_ONLY = ("img_size", "patch_size", "window_size", "global_block_indexes")


def add_revvit_config(cfg):
    """Add ``cfg.MODEL.REVVIT`` (variant and backbone options) to a detectron2 config."""
    cfg.MODEL.REVVIT = CN()
    cfg.MODEL.REVVIT.VARIANT = "rev_vit_b"  # any revvit_d2.list_models() name
    cfg.MODEL.REVVIT.DROP_PATH_RATE = 0.1
    # The engine options under their keyword names in upper case (USE_REV_BACKPROP,
    # ACT_CHECKPOINT, PARALLEL_BACKWARD, REV_ANCHOR_EVERY, CHECK_FINITE, COMPILE_BLOCKS),
    # with the defaults of revvit_d2.modeling.EngineOptions.
    for f in dataclasses.fields(EngineOptions):
        cfg.MODEL.REVVIT[f.name.upper()] = f.default
    cfg.MODEL.REVVIT.FREEZE_PATCH_EMBED = False
    cfg.MODEL.REVVIT.FREEZE_BLOCKS = 0
    # Rev-ViT + SimpleFeaturePyramid
    cfg.MODEL.REVVIT.IMG_SIZE = 224  # pre-training size (position-embedding grid)
    cfg.MODEL.REVVIT.WINDOW_SIZE = 0
    cfg.MODEL.REVVIT.GLOBAL_BLOCK_INDEXES = []
    cfg.MODEL.REVVIT.SCALE_FACTORS = [4.0, 2.0, 1.0, 0.5]
    cfg.MODEL.REVVIT.SQUARE_PAD = 0
    # Optional HybridStem instead of the patch projection (not in the official Rev-ViT); its
    # stride, 4 x 2 per stage after the first, must equal the variant's patch size (16 here).
    cfg.MODEL.REVVIT.HYBRID_STEM = CN()
    cfg.MODEL.REVVIT.HYBRID_STEM.ENABLED = False
    cfg.MODEL.REVVIT.HYBRID_STEM.STEM_CHANNELS = 64
    cfg.MODEL.REVVIT.HYBRID_STEM.STAGE_CHANNELS = [64, 128, 256]
    cfg.MODEL.REVVIT.HYBRID_STEM.BLOCKS_PER_STAGE = 2
    cfg.MODEL.REVVIT.HYBRID_STEM.NORM = "GN"
    # Rev-MViT + FPN
    cfg.MODEL.REVVIT.OUT_FEATURES = ["scale2", "scale3", "scale4", "scale5"]
    return cfg


def _core_kwargs(c):
    kwargs = get_model_kwargs(c.VARIANT)
    kwargs.update(drop_path_rate=c.DROP_PATH_RATE, freeze_patch_embed=c.FREEZE_PATCH_EMBED,
                  freeze_blocks=c.FREEZE_BLOCKS)
    kwargs.update({name: c[name.upper()] for name in EngineOptions.names()})
    kwargs.pop("num_classes", None)
    return kwargs


@BACKBONE_REGISTRY.register()
def build_revvit_sfp_backbone(cfg, input_shape: ShapeSpec):
    """Rev-ViT + SimpleFeaturePyramid (p2-p6), the ViTDet recipe."""
    c = cfg.MODEL.REVVIT
    kwargs = _core_kwargs(c)
    kwargs.update(img_size=c.IMG_SIZE, window_size=c.WINDOW_SIZE,
                  global_block_indexes=tuple(c.GLOBAL_BLOCK_INDEXES))
    h = c.HYBRID_STEM
    if h.ENABLED:
        kwargs["stem"] = HybridStem(out_channels=kwargs["embed_dim"], stem_channels=h.STEM_CHANNELS,
                                    stage_channels=tuple(h.STAGE_CHANNELS),
                                    blocks_per_stage=h.BLOCKS_PER_STAGE, norm=h.NORM)
    net = RevViTBackbone(**kwargs)
    return RevSimpleFeaturePyramid(
        net=net, in_feature="last_feat", out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        scale_factors=tuple(c.SCALE_FACTORS), top_block=LastLevelMaxPool(), norm="LN",
        square_pad=c.SQUARE_PAD)


@BACKBONE_REGISTRY.register()
def build_revmvit_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Rev-MViT + FPN on scale2..scale5 (p2-p6)."""
    c = cfg.MODEL.REVVIT
    kwargs = _core_kwargs(c)
    for key in _VIT_ONLY:
        kwargs.pop(key, None)
    bottom_up = RevMViTBackbone(out_features=tuple(c.OUT_FEATURES), **kwargs)
    # p_{k+1} pools the coarsest level p_k (p5 for the four-level Rev-MViT-B)
    coarsest = int(bottom_up.output_shape()[c.OUT_FEATURES[-1]].stride).bit_length() - 1
    top_block = LastLevelMaxPool(in_feature=f"p{coarsest}")
    return FPN(bottom_up=bottom_up, in_features=list(c.OUT_FEATURES),
               out_channels=cfg.MODEL.FPN.OUT_CHANNELS, norm=cfg.MODEL.FPN.NORM,
               top_block=top_block, fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
