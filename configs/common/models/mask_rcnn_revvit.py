"""Mask R-CNN with a Rev-ViT-B backbone behind a SimpleFeaturePyramid (the ViTDet design).

Starts from detectron2's own ``common/models/mask_rcnn_vitdet.py`` (LN heads, 2-conv RPN,
4conv1fc box head) and swaps the plain ViT for a reversible one. The pyramid is detectron2's
SimpleFeaturePyramid with corrected padding constraints (revvit_d2.d2.RevSimpleFeaturePyramid).
"""
from dataclasses import asdict

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from revvit_d2.d2 import LastLevelMaxPool, RevSimpleFeaturePyramid, RevViTBackbone
from revvit_d2.modeling import EngineOptions, get_model_kwargs

_REV_VIT_B = {k: v for k, v in get_model_kwargs("rev_vit_b").items() if k != "num_classes"}

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model

model.backbone = L(RevSimpleFeaturePyramid)(
    net=L(RevViTBackbone)(
        # Rev-ViT-B's dimensions from the variant registry, with the detection settings below.
        **dict(
            _REV_VIT_B,
            img_size=224,  # pre-training grid of the position embedding; interpolated at 1024
            patch_size=16,
            drop_path_rate=0.1,
            window_size=14,
            global_block_indexes=(2, 5, 8, 11),
            # the reversible engine's options at their defaults (use_rev_backprop, act_checkpoint,
            # parallel_backward, rev_anchor_every, check_finite, compile_blocks, stored_blocks,
            # rev_backward_chunk; documented in
            # revvit_d2.modeling.EngineOptions), e.g. override ...use_rev_backprop=False
            **asdict(EngineOptions()),
            out_feature="last_feat",
        ),
    ),
    in_feature="${.net.out_feature}",
    out_channels=256,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    top_block=L(LastLevelMaxPool)(),
    norm="LN",
    square_pad=1024,
)
