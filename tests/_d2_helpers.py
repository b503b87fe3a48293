"""Tiny Detectron2 backbones and a fake training batch, shared by test_d2.py, test_properties.py
and the DDP worker (imports detectron2)."""
import torch
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.structures import BitMasks, Boxes, Instances

from revvit_d2.d2 import HybridStem, RevMViTBackbone, RevSimpleFeaturePyramid, RevViTBackbone

TINY_VIT = dict(img_size=64, embed_dim=64, depth=4, num_heads=2)
TINY_MVIT = dict(input_size=(64, 64), embed_dim=16, depth=7, num_heads=1,
                 dim_mul=((1, 2.0), (3, 2.0), (5, 2.0)), head_mul=((1, 2.0), (3, 2.0), (5, 2.0)),
                 pool_q_stride=((1, 1, 2, 2), (3, 1, 2, 2), (5, 1, 2, 2)),
                 transition_layers=(1, 3, 5))


def tiny_sfp(**kw):
    """Rev-ViT behind detectron2's simple feature pyramid (the ViTDet design)."""
    net = RevViTBackbone(**dict(TINY_VIT, **kw))
    return RevSimpleFeaturePyramid(net=net, in_feature="last_feat", out_channels=32,
                                   scale_factors=(4.0, 2.0, 1.0, 0.5),
                                   top_block=LastLevelMaxPool(), norm="LN")


def hybrid_stem():
    # three stages: stride 4 * 2 * 2 = 16, TINY_VIT's patch size
    # detectron2's "GN" has 32 groups; its BasicBlock downsamples only when the width changes
    return HybridStem(out_channels=TINY_VIT["embed_dim"], stem_channels=32,
                      stage_channels=(32, 64, 96), blocks_per_stage=1)


def tiny_sfp_hybrid(**kw):
    return tiny_sfp(stem=hybrid_stem(), **kw)


def tiny_fpn(**kw):
    """Rev-MViT behind detectron2's FPN."""
    bottom_up = RevMViTBackbone(**dict(TINY_MVIT, **kw))
    return FPN(bottom_up=bottom_up, in_features=list(bottom_up.output_shape()), out_channels=32,
               top_block=LastLevelMaxPool())


def fake_batch(num_classes, size=(64, 96)):
    """Two detectron2 training inputs with two boxes and box-shaped bitmasks each."""
    batch = []
    for _ in range(2):
        inst = Instances(size)
        boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]])
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.tensor([0, num_classes - 1])
        masks = torch.zeros(2, *size, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[i, y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": torch.randint(0, 255, (3, *size), dtype=torch.uint8).float(),
                      "instances": inst, "height": size[0], "width": size[1]})
    return batch
