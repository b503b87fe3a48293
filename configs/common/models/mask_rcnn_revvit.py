"""Mask R-CNN with a Rev-ViT-B backbone behind a SimpleFeaturePyramid (the ViTDet design).

Starts from detectron2's own ``common/models/mask_rcnn_vitdet.py`` (LN heads, 2-conv RPN,
4conv1fc box head) and swaps the plain ViT for a reversible one. The pyramid is detectron2's
SimpleFeaturePyramid with corrected padding constraints (revvit_d2.d2.RevSimpleFeaturePyramid).
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from revvit_d2.d2 import LastLevelMaxPool, RevSimpleFeaturePyramid, RevViTBackbone

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model

model.backbone = L(RevSimpleFeaturePyramid)(
    net=L(RevViTBackbone)(
        img_size=224,  # pre-training grid of the position embedding; interpolated at 1024
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.1,
        window_size=14,
        global_block_indexes=(2, 5, 8, 11),
        # the reversible engine (revvit_d2.modeling.EngineOptions documents each option)
        use_rev_backprop=True,
        act_checkpoint=False,
        parallel_backward=False,
        rev_anchor_every=0,
        check_finite=False,
        compile_blocks=False,
        out_feature="last_feat",
    ),
    in_feature="${.net.out_feature}",
    out_channels=256,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    top_block=L(LastLevelMaxPool)(),
    norm="LN",
    square_pad=1024,
)
