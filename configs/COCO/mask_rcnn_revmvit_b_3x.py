"""Rev-MViT-B Mask R-CNN + FPN, the MViTv2 detection recipe (3x = 36 epochs).

    python tools/train_net.py --config-file configs/COCO/mask_rcnn_revmvit_b_3x.py \
        --num-gpus 8 train.init_checkpoint=REV_MVIT_B.pyth

Data: multi-scale training (short side 480-800, max 1333) with a random crop half of the time,
test at 800/1333, as detectron2's MViTv2 configs.
"""
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from ..common.models.mask_rcnn_revmvit import model

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.augmentations = [
    L(T.RandomApply)(
        tfm_or_aug=L(T.AugmentationList)(augs=[
            L(T.ResizeShortestEdge)(short_edge_length=[400, 500, 600], sample_style="choice"),
            L(T.RandomCrop)(crop_type="absolute_range", crop_size=(384, 600)),
        ]),
        prob=0.5,
    ),
    L(T.ResizeShortestEdge)(
        short_edge_length=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
        sample_style="choice", max_size=1333),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 64
dataloader.test.mapper.image_format = "RGB"

train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
train.init_checkpoint = "REV_MVIT_B.pyth"

# 36 epochs of 118k images at batch 64: 36 * 118000 / 64 ~= 67500 iterations;
# steps at 52500 and 62500 (as MViTv2's 3x).
train.max_iter = 67500
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[52500, 62500], num_updates=train.max_iter),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params.overrides = {
    "pos_embed": {"weight_decay": 0.0},
}
optimizer.lr = 1.6e-4
optimizer.weight_decay = 0.05
