"""The Detectron2 wrapping of the reversible backbones (imports detectron2)."""
from .backbone import (HybridStem, LastLevelMaxPool, RevMViTBackbone, RevSimpleFeaturePyramid,
                       RevViTBackbone)
from .checkpoint import RevvitCheckpointer, find_reversible_core
from .coco_json import register_coco_instances
from .yacs import add_revvit_config, build_revmvit_fpn_backbone, build_revvit_sfp_backbone

__all__ = [
    "HybridStem",
    "LastLevelMaxPool",
    "RevMViTBackbone",
    "RevSimpleFeaturePyramid",
    "RevViTBackbone",
    "RevvitCheckpointer",
    "add_revvit_config",
    "build_revmvit_fpn_backbone",
    "build_revvit_sfp_backbone",
    "find_reversible_core",
    "register_coco_instances",
]
