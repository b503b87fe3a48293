"""Mask R-CNN with a Rev-MViT-B backbone behind detectron2's FPN (scale2..scale5 -> p2..p6).

Starts from detectron2's ``common/models/mask_rcnn_fpn.py`` with the MViTv2 detection choices
(LN in the box/mask heads, 2-conv RPN, 4conv1fc box head).
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

from revvit_d2.d2 import RevMViTBackbone

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
constants = model_zoo.get_config("common/data/constants.py").constants
model.pixel_mean = constants.imagenet_rgb256_mean
model.pixel_std = constants.imagenet_rgb256_std
model.input_format = "RGB"

model.backbone = L(FPN)(
    bottom_up=L(RevMViTBackbone)(
        input_size=(224, 224),  # pre-training grid of the position embedding
        patch_kernel=(7, 7),
        patch_stride=(4, 4),
        patch_padding=(3, 3),
        embed_dim=96,
        depth=16,
        num_heads=1,
        mlp_ratio=4.0,
        qkv_bias=True,
        dim_mul=((1, 2.0), (3, 2.0), (14, 2.0)),
        head_mul=((1, 2.0), (3, 2.0), (14, 2.0)),
        pool_q_stride=((1, 1, 2, 2), (3, 1, 2, 2), (14, 1, 2, 2)),
        pool_kvq_kernel=(1, 3, 3),
        pool_kv_stride_adaptive=(1, 4, 4),
        transition_layers=(1, 3, 14),
        pre_q_fusion="concat_linear_2",
        drop_path_rate=0.2,
        # the reversible engine (revvit_d2.modeling.EngineOptions documents each option)
        use_rev_backprop=True,
        act_checkpoint=False,
        parallel_backward=False,
        rev_anchor_every=0,
        check_finite=False,
        compile_blocks=False,
        out_features=("scale2", "scale3", "scale4", "scale5"),
    ),
    in_features="${.bottom_up.out_features}",
    out_channels=256,
    top_block=L(LastLevelMaxPool)(),
)
model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = "LN"
model.proposal_generator.head.conv_dims = [-1, -1]
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
model.roi_heads.box_head.fc_dims = [1024]
