"""The installed stack works: a broken torch/torchvision pair or a missing dependency fails here
first, with a clear reason (see ENVIRONMENT.md, the pairing trap)."""
import torch
import torchvision


def test_torchvision_ops_nms_runs():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep = torchvision.ops.nms(boxes, scores, 0.5)
    assert keep.tolist() == [0, 2]


def test_detectron2_imports_and_builds_fpn_parts():
    import detectron2
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.fpn import FPN  # noqa: F401
    from detectron2.modeling.backbone.vit import SimpleFeaturePyramid  # noqa: F401
    from detectron2.structures import Boxes, pairwise_iou

    assert detectron2.__version__
    iou = pairwise_iou(Boxes(torch.tensor([[0.0, 0, 10, 10]])), Boxes(torch.tensor([[0.0, 0, 10, 10]])))
    assert iou.item() == 1.0
    assert ShapeSpec(channels=3).channels == 3


def test_pytorchvideo_and_av_import():
    import av
    import pytorchvideo.data  # noqa: F401
    import pytorchvideo.models  # noqa: F401

    assert av.__version__


def test_fvcore_and_pycocotools_import():
    import fvcore.nn  # noqa: F401
    import pycocotools.mask as mask_util
    import numpy as np

    rle = mask_util.encode(np.asfortranarray(np.ones((4, 4), dtype=np.uint8)))
    assert mask_util.area(rle) == 16
