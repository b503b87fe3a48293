"""The built-in synthetic datasets, generated on first use (no real data can be downloaded here).

Every generator is deterministic (same parameters and seed -> the same bytes) and write-once
through :func:`revvit_d2.data.generated.generate_once`:

* :mod:`.coco_shapes`: COCO-format instance segmentation of shapes (the Mask R-CNN demo);
* :mod:`.imagenet`: an ImageNet-layout folder of shape classes (the ImageNet evaluation demo);
* :mod:`.kinetics`: Kinetics-layout mp4 clips whose classes differ by motion (the video demo).
"""
from .coco_shapes import make_synthetic_coco
from .imagenet import make_synthetic_imagefolder
from .kinetics import make_synthetic_kinetics

__all__ = ["make_synthetic_coco", "make_synthetic_imagefolder", "make_synthetic_kinetics"]
