"""Detectron2 backbones over the core reversible models.

* :class:`RevViTBackbone`: Rev-ViT giving ``last_feat`` at stride 16, meant to sit under
  detectron2's :class:`SimpleFeaturePyramid` (the ViTDet recipe), here through
  :class:`RevSimpleFeaturePyramid`, which only corrects the pyramid's padding constraints.
* :class:`RevMViTBackbone`: Rev-MViT giving ``scale2``..``scale5`` at strides 4..32, meant to sit
  under detectron2's :class:`FPN`.

Both *are* the core model classes (multiple inheritance), so their parameter names are the core
names (``blocks.3.F.attn.qkv.weight``) under the backbone's prefix, and official checkpoints load
with one prefix (see :mod:`revvit_d2.d2.checkpoint`).
"""
from typing import Dict, Sequence

import torch
from detectron2.modeling import Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool as _LastLevelMaxPool
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid

from ..modeling.rev_mvit import RevMViT
from ..modeling.rev_vit import RevViT

__all__ = ["RevViTBackbone", "RevMViTBackbone", "RevSimpleFeaturePyramid", "LastLevelMaxPool"]


class LastLevelMaxPool(_LastLevelMaxPool):
    """detectron2's LastLevelMaxPool with a configurable input level (upstream: always "p5"),
    for pyramids whose coarsest level is not p5 (e.g. a patch-8 Rev-ViT gives p2..p4)."""

    def __init__(self, in_feature: str = "p5"):
        super().__init__()
        self.in_feature = in_feature


class RevViTBackbone(RevViT, Backbone):
    """Rev-ViT as a single-scale detectron2 backbone.

    Args:
        out_feature (str): name of the output, ``"last_feat"`` (stride = patch size, channels =
            2 x embed_dim with the default ``fuse="concat"``).
        freeze_patch_embed (bool): freeze the patch embedding and the position embedding.
        freeze_blocks (int): freeze the first this many reversible blocks (their parameters
            receive no gradient; the reversible backward still runs through them).
        **kwargs: :class:`~revvit_d2.modeling.rev_vit.RevViT` arguments (``img_size`` is the
            pre-training size that defines the position-embedding grid; other input sizes
            interpolate it). No classification head is built.
    """

    def __init__(self, *, out_feature: str = "last_feat", freeze_patch_embed: bool = False,
                 freeze_blocks: int = 0, **kwargs):
        kwargs["num_classes"] = 0
        super().__init__(**kwargs)
        if out_feature != "last_feat":
            raise ValueError(f"RevViTBackbone has one output, 'last_feat' (got {out_feature!r})")
        del self.head, self.head_drop
        self._out_features = [out_feature]
        self._out_feature_channels = {out_feature: self.num_features}
        self._out_feature_strides = {out_feature: self.patch_size}
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)
            self.pos_embed.requires_grad_(False)
        for blk in self.blocks[:freeze_blocks]:
            blk.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x: (N, 3, H, W) with H, W multiples of the patch size -> {"last_feat": (N, 2C, H/16,
        W/16)}."""
        return self.forward_features(x)

    @property
    def size_divisibility(self) -> int:
        return self.patch_size

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self.patch_size, "square_size": 0}


class RevMViTBackbone(RevMViT, Backbone):
    """Rev-MViT (image) as a multi-scale detectron2 backbone.

    Args:
        out_features (sequence): levels to return among ``scale2``..``scale5`` (strides 4..32,
            2C channels each: 192/384/768/1536 for Rev-MViT-B); each gets a learned LayerNorm.
        freeze_patch_embed (bool): freeze the patch and position embeddings.
        freeze_blocks (int): freeze the first this many layers (reversible or transition).
        **kwargs: :class:`~revvit_d2.modeling.rev_mvit.RevMViT` arguments. No head is built.
    """

    def __init__(self, *, out_features: Sequence[str] = ("scale2", "scale3", "scale4", "scale5"),
                 freeze_patch_embed: bool = False, freeze_blocks: int = 0, **kwargs):
        kwargs["num_classes"] = 0
        super().__init__(out_features=tuple(out_features), **kwargs)
        if self.is_video:
            raise ValueError("RevMViTBackbone is for images: give a 2-D input_size")
        del self.head, self.head_drop
        # The final norm only serves the classifier; every returned level has its own norm
        # (an unused parameter would also need DDP's find_unused_parameters).
        self.norm = None
        self._out_features = list(out_features)
        self._out_feature_channels = {n: self.feature_channels[n] for n in out_features}
        self._out_feature_strides = {n: self.feature_strides[n] for n in out_features}
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)
            for name, p in self.named_parameters(recurse=False):
                if name.startswith("pos_embed"):
                    p.requires_grad_(False)
        for blk in self.blocks[:freeze_blocks]:
            blk.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.forward_features(x)
        return {k: feats[k] for k in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return max(self.feature_strides.values())

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self.size_divisibility, "square_size": 0}


class RevSimpleFeaturePyramid(SimpleFeaturePyramid):
    """detectron2's :class:`SimpleFeaturePyramid`, with its padding constraints corrected.

    The upstream class returns ``{"size_divisiblity": ..., "square_size": ...}``; the misspelled
    key is never read by ``ImageList.from_tensors``, and ``size_divisibility`` is left at the
    base class's 0, so without ``square_pad`` images are not padded to the largest stride and the
    p5/p6 maps of odd-sized images are misaligned. Same arguments as the upstream class.
    """

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self._size_divisibility, "square_size": self._square_pad}
