"""Built-in demo: a small Rev-ViT Mask R-CNN trained from scratch on the CPU, on a generated
COCO-format shapes dataset (revvit_d2.data.synthetic.coco_shapes: 6 shape classes with random colours,
scale, position, rotation and overlap on plain backgrounds; 1000 train / 200 val images of
128-144 px, used at their native size).

    python tools/train_net.py            # this config is the default

Same model design as mask_rcnn_revvit_b_100ep.py (reversible ViT + SimpleFeaturePyramid, LN
heads), scaled down for a CPU and small images: stride-8 tokens (16-18 a side), 128 wide, 4
reversible blocks, a p2-p5 pyramid of 64 channels, 2fc box head. One departure from the official
Rev-ViT: the tokens come from a small ResNet (revvit_d2.d2.HybridStem, the "hybrid" ViT) instead
of a linear patch projection, because from scratch and in a CPU budget the patch projection does
not learn to localise (box AP 8.9 vs 28.6 after 400 iterations; docs/detection.md). Set
``model.backbone.net.stem = None`` for the plain patch-8 Rev-ViT.
"""
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data import get_detection_dataset_dicts
from detectron2.evaluation import COCOEvaluator
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler

from revvit_d2.d2 import HybridStem
from revvit_d2.d2.data import SafeDatasetMapper

from ..common.models.mask_rcnn_revvit import model

# -- model: tiny hybrid reversible ViT; 64-channel pyramid, 2fc box head and 2-conv mask head ---
model.backbone.net.update(img_size=128, patch_size=8, embed_dim=128, depth=4, num_heads=4,
                          drop_path_rate=0.0, window_size=0, global_block_indexes=())
# A 7x7 stride-2 conv, max pool and one basic block at strides 4 and 8 (GroupNorm) -> 128 wide.
model.backbone.net.stem = L(HybridStem)(out_channels="${..embed_dim}", stem_channels=64,
                                        stage_channels=(64, 128), blocks_per_stage=1)
model.backbone.square_pad = 0
# Stride-8 tokens: p2 (x2), p3 (x1), p4 (x0.5) and p5 (max-pooled p4). Objects are 20-90 px.
model.backbone.scale_factors = (2.0, 1.0, 0.5)
model.backbone.top_block.in_feature = "p4"
model.proposal_generator.in_features = ["p2", "p3", "p4", "p5"]
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128]]
model.proposal_generator.anchor_generator.strides = [4, 8, 16, 32]
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
# One sample per bin: the adaptive default makes ROIAlign's CPU backward costly
# (benchmarks/roi_align_cpu.py: 1 sample is 2.7x faster than 2x2; docs/detection.md).
model.roi_heads.box_pooler.sampling_ratio = 1
model.roi_heads.mask_pooler.sampling_ratio = 1

# -- data: the synthetic split names are registered by tools/train_net.py on first use ---------
dataloader = dict(
    train=L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names="revvit_shapes_train"),
        mapper=L(SafeDatasetMapper)(
            is_train=True,
            # Native size (128-144 px), no augmentation: the measured demo setting.
            augmentations=[],
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
            augmentations=[]),
        num_workers=1,
    ),
    evaluator=L(COCOEvaluator)(dataset_name="revvit_shapes_val"),
)

# -- schedule: 800 iterations at batch 4 (3.2 epochs of the 1000 training images) -------------
train = model_zoo.get_config("common/train.py").train
train.device = "cpu"
train.output_dir = "./output/mask_rcnn_revvit_synthetic"
train.max_iter = 800
train.eval_period = 800
train.log_period = 20
train.checkpointer.period = 400
train.checkpointer.max_to_keep = 2
# Pinned so that `make demo` and the AP it documents repeat on a given machine (detectron2's
# convention, -1, draws a seed per run; a 400-iteration run with an unlucky draw collapsed).
train.seed = 2
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.01),
    warmup_length=80 / train.max_iter,
    warmup_factor=0.01,
)
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 2e-3
optimizer.weight_decay = 0.05
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
