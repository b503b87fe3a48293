"""Mask R-CNN with a Rev-MViT-B backbone behind detectron2's FPN (scale2..scale5 -> p2..p6).

Starts from detectron2's ``common/models/mask_rcnn_fpn.py`` with the MViTv2 detection choices
(LN in the box/mask heads, 2-conv RPN, 4conv1fc box head).
"""
from dataclasses import asdict

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

from revvit_d2.d2 import RevMViTBackbone
from revvit_d2.modeling import EngineOptions, get_model_kwargs

_REV_MVIT_B = {k: v for k, v in get_model_kwargs("rev_mvit_b").items() if k != "num_classes"}

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
constants = model_zoo.get_config("common/data/constants.py").constants
model.pixel_mean = constants.imagenet_rgb256_mean
model.pixel_std = constants.imagenet_rgb256_std
model.input_format = "RGB"

model.backbone = L(FPN)(
    bottom_up=L(RevMViTBackbone)(
        # Rev-MViT-B's dimensions from the variant registry (input_size (224, 224): the
        # pre-training grid of the position embedding), with the detection settings below.
        **dict(
            _REV_MVIT_B,
            drop_path_rate=0.2,
            # the reversible engine's options at their defaults (use_rev_backprop, act_checkpoint,
            # parallel_backward, rev_anchor_every, check_finite, compile_blocks, stored_blocks,
            # rev_backward_chunk; documented in
            # revvit_d2.modeling.EngineOptions), e.g. override ...use_rev_backprop=False
            **asdict(EngineOptions()),
            out_features=("scale2", "scale3", "scale4", "scale5"),
        ),
    ),
    in_features="${.bottom_up.out_features}",
    out_channels=256,
    top_block=L(LastLevelMaxPool)(),
)
model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = "LN"
model.proposal_generator.head.conv_dims = [-1, -1]
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
model.roi_heads.box_head.fc_dims = [1024]
