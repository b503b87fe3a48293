"""Built-in demo: a small Rev-ViT Mask R-CNN trained from scratch on the CPU, on a generated
COCO-format shapes dataset (revvit_d2.data.coco_synthetic: 6 shape classes with random colours,
scale, position, rotation and overlap; 1000 train / 200 val images of 128-192 px, upscaled to a
short side of 224-288 for training and 256 for testing).

    python tools/train_net.py            # this config is the default

Same model design as mask_rcnn_revvit_b_100ep.py (reversible ViT + SimpleFeaturePyramid, LN
heads), scaled down: 192 wide, 6 blocks, 64-channel pyramid, 2fc box head.
"""
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler

from revvit_d2.data.coco_synthetic import SafeDatasetMapper

from ..common.models.mask_rcnn_revvit import model

# -- model: tiny reversible ViT; 64-channel pyramid, 2fc box head and 2-conv mask head ----------
model.backbone.net.update(img_size=256, patch_size=16, embed_dim=192, depth=6, num_heads=3,
                          drop_path_rate=0.0, window_size=0, global_block_indexes=())
model.backbone.square_pad = 0
channels = 64
model.backbone.out_channels = channels
model.proposal_generator.head.in_channels = channels
model.proposal_generator.pre_nms_topk = (1000, 500)
model.proposal_generator.post_nms_topk = (300, 100)
model.proposal_generator.batch_size_per_image = 128
model.roi_heads.num_classes = 6
model.roi_heads.batch_size_per_image = 64
model.roi_heads.box_head.input_shape.channels = channels
model.roi_heads.box_head.conv_dims = []
model.roi_heads.box_head.fc_dims = [256, 256]
model.roi_heads.box_predictor.input_shape.channels = 256
model.roi_heads.mask_head.input_shape.channels = channels
model.roi_heads.mask_head.conv_dims = [channels] * 2

# -- data: the synthetic split names are registered by tools/train_net.py on first use ---------
dataloader = dict(
    train=L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names="revvit_shapes_train"),
        mapper=L(SafeDatasetMapper)(
            is_train=True,
            # The images are 128-192 px; upscaling gives the stride-16 backbone 14-18 tokens a
            # side (AP 6.6 vs 3.5 at native size in our runs; see docs/detection.md).
            augmentations=[L(T.RandomFlip)(horizontal=True),
                           L(T.ResizeShortestEdge)(short_edge_length=(224, 256, 288),
                                                   sample_style="choice", max_size=400)],
            image_format="RGB",
            use_instance_mask=True,
            instance_mask_format="bitmask",  # the synthetic masks are RLE
            recompute_boxes=False,
        ),
        total_batch_size=4,
        num_workers=1,
    ),
    test=L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names="revvit_shapes_val", filter_empty=False),
        mapper=L(SafeDatasetMapper)(
            is_train=False, image_format="RGB",
            augmentations=[L(T.ResizeShortestEdge)(short_edge_length=256, max_size=400)]),
        num_workers=1,
    ),
    evaluator=L(COCOEvaluator)(dataset_name="revvit_shapes_val"),
)

# -- schedule: 500 iterations at batch 4 (2 epochs of the 1000 training images) ---------------
train = model_zoo.get_config("common/train.py").train
train.device = "cpu"
train.output_dir = "./output/mask_rcnn_revvit_synthetic"
train.max_iter = 500
train.eval_period = 500
train.log_period = 20
train.checkpointer.period = 250
train.checkpointer.max_to_keep = 2
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.01),
    warmup_length=50 / train.max_iter,
    warmup_factor=0.01,
)
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 3e-4
optimizer.weight_decay = 0.05
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
