"""COCO loaders with large-scale jitter (LSJ), as ViTDet trains: flip, resize by a random scale
in [0.1, 2.0] of 1024, crop/pad to 1024x1024; test with the short side at 1024."""
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.recompute_boxes = True
dataloader.train.mapper.image_format = "RGB"
image_size = 1024
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size,
                     target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.train.total_batch_size = 64
dataloader.test.mapper.image_format = "RGB"
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size),
]
