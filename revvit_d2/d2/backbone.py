"""Detectron2 backbones over the core reversible models.

* :class:`RevViTBackbone`: Rev-ViT giving ``last_feat`` at stride 16, meant to sit under
  detectron2's :class:`SimpleFeaturePyramid` (the ViTDet recipe), here through
  :class:`RevSimpleFeaturePyramid`, which only corrects the pyramid's padding constraints.
* :class:`RevMViTBackbone`: Rev-MViT giving ``scale2``..``scale5`` at strides 4..32, meant to sit
  under detectron2's :class:`FPN`.
* :class:`HybridStem`: an optional small ResNet in place of the Rev-ViT patch projection (the
  "hybrid" ViT of Dosovitskiy et al.), for training from scratch on little data.

Both *are* the core model classes (multiple inheritance), so their parameter names are the core
names (``blocks.3.F.attn.qkv.weight``) under the backbone's prefix, and official checkpoints load
with one prefix (see :mod:`revvit_d2.d2.checkpoint`).
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as nnf
from torch import nn
from detectron2.layers import Conv2d
from detectron2.modeling import Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool as _LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid

from ..modeling.layers import init_official_weights
from ..modeling.rev_mvit import RevMViT
from ..modeling.rev_vit import RevViT

__all__ = ["RevViTBackbone", "RevMViTBackbone", "RevSimpleFeaturePyramid", "LastLevelMaxPool",
           "HybridStem"]


class LastLevelMaxPool(_LastLevelMaxPool):
    """detectron2's LastLevelMaxPool with a configurable input level (upstream: always "p5"),
    for pyramids whose coarsest level is not p5 (e.g. a patch-8 Rev-ViT gives p2..p4)."""

    def __init__(self, in_feature: str = "p5"):
        super().__init__()
        self.in_feature = in_feature


class HybridStem(nn.Module):
    """A small ResNet that turns an image into Rev-ViT tokens: the "hybrid" ViT of Dosovitskiy et
    al. (2021), whose input sequence is a CNN feature map instead of linearly projected patches.

    detectron2's ``BasicStem`` (7x7 conv, stride 2, and a stride-2 max pool) is followed by
    stages of ``BasicBlock``s (the first stage keeps the resolution, each later one halves it)
    and a 1x1 projection to the token width. The stride is ``4 * 2 ** (len(stage_channels) -
    1)``: 8 with the default two stages. It is not part of the official Rev-ViT (official
    checkpoints have no weights for it) and its activations are stored for the backward pass
    like any non-reversible layer; it exists because a patch projection learns slowly from
    scratch on small data (measured in docs/detection.md).

    Args:
        out_channels (int): token width (the Rev-ViT ``embed_dim``).
        in_chans (int): image channels.
        stem_channels (int): channels of the 7x7 stem.
        stage_channels (sequence of int): channels of each stage of basic blocks; every stage
            after the first must change the width (it downsamples).
        blocks_per_stage (int): basic blocks per stage.
        norm (str): detectron2 norm name for every conv (``"GN"`` by default: batch statistics
            of a few images per GPU are poor, and GroupNorm behaves the same in training and
            inference).
    """

    def __init__(self, out_channels: int, in_chans: int = 3, stem_channels: int = 64,
                 stage_channels: Sequence[int] = (64, 128), blocks_per_stage: int = 2,
                 norm: str = "GN"):
        super().__init__()
        if not stage_channels:
            raise ValueError("HybridStem needs at least one stage")
        self.stem = BasicStem(in_chans, stem_channels, norm=norm)
        stages, c_in = [], stem_channels
        for i, c_out in enumerate(stage_channels):
            if i > 0 and c_out == c_in:
                # detectron2's BasicBlock has a (strided) shortcut conv only when the width
                # changes, so a downsampling block with the same width cannot add its input
                raise ValueError(f"stage {i} halves the resolution and must change the width "
                                 f"(got {c_in} -> {c_out} channels)")
            strides = [1 if i == 0 else 2] + [1] * (blocks_per_stage - 1)
            blocks = ResNet.make_stage(BasicBlock, blocks_per_stage, in_channels=c_in,
                                       out_channels=c_out, stride_per_block=strides, norm=norm)
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.proj = Conv2d(c_in, out_channels, kernel_size=1)
        self.stride = 4 * 2 ** (len(stage_channels) - 1)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stages(self.stem(x)))


class RevViTBackbone(RevViT, Backbone):
    """Rev-ViT as a single-scale detectron2 backbone.

    Args:
        out_feature (str): name of the output, ``"last_feat"`` (stride = patch size, channels =
            2 x embed_dim with the default ``fuse="concat"``).
        freeze_patch_embed (bool): freeze the patch embedding and the position embedding.
        freeze_blocks (int): freeze the first this many reversible blocks (their parameters
            receive no gradient; the reversible backward still runs through them).
        stem (nn.Module, optional): replaces the patch projection (``patch_embed.proj``), e.g.
            a :class:`HybridStem`; it must map (N, 3, H, W) to (N, embed_dim, H/patch_size,
            W/patch_size) and declare ``stride == patch_size``. Frozen with the patch embedding.
        **kwargs: :class:`~revvit_d2.modeling.rev_vit.RevViT` arguments (``img_size`` is the
            pre-training size that defines the position-embedding grid; other input sizes
            interpolate it). No classification head is built.
    """

    def __init__(self, *, out_feature: str = "last_feat", freeze_patch_embed: bool = False,
                 freeze_blocks: int = 0, stem: Optional[nn.Module] = None, **kwargs):
        kwargs["num_classes"] = 0
        super().__init__(**kwargs)
        if out_feature != "last_feat":
            raise ValueError(f"RevViTBackbone has one output, 'last_feat' (got {out_feature!r})")
        if stem is not None:
            stride = getattr(stem, "stride", None)
            channels = getattr(stem, "out_channels", None)
            if stride != self.patch_size or channels != self.embed_dim:
                raise ValueError(
                    f"the stem must have stride == patch_size ({self.patch_size}) and "
                    f"out_channels == embed_dim ({self.embed_dim}); got stride {stride}, "
                    f"out_channels {channels}")
            self.patch_embed.proj = stem
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

    Differs from the core model in its normalisation: every returned level gets its own learned
    LayerNorm (``out_norms.<level>``, initialised as the official model's norms), and the
    classifier's final norm and head are removed (an unused parameter would also need DDP's
    ``find_unused_parameters``). Levels that are not returned are normalised without affine
    parameters.

    Args:
        out_features (sequence): levels to return among ``scale2``..``scale5`` (strides 4..32,
            2C channels each: 192/384/768/1536 for Rev-MViT-B).
        freeze_patch_embed (bool): freeze the patch and position embeddings.
        freeze_blocks (int): freeze the first this many layers (reversible or transition).
        **kwargs: :class:`~revvit_d2.modeling.rev_mvit.RevMViT` arguments. No head is built.
    """

    def __init__(self, *, out_features: Sequence[str] = ("scale2", "scale3", "scale4", "scale5"),
                 freeze_patch_embed: bool = False, freeze_blocks: int = 0, **kwargs):
        kwargs["num_classes"] = 0
        super().__init__(**kwargs)
        if self.is_video:
            raise ValueError("RevMViTBackbone is for images: give a 2-D input_size")
        unknown = set(out_features) - set(self.feature_names)
        if unknown:
            raise ValueError(f"unknown out_features {sorted(unknown)}; this model has "
                             f"{self.feature_names}")
        del self.head, self.head_drop, self.norm
        self.out_norms = nn.ModuleDict({
            n: nn.LayerNorm(c, eps=1e-6)
            for n, c in zip(self.feature_names, self.stage_channels) if n in out_features})
        self.out_norms.apply(init_official_weights)
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

    def _level_output(self, name: str, tokens: torch.Tensor, last: bool) -> torch.Tensor:
        if name in self.out_norms:
            return self.fuse(self.out_norms[name](tokens))
        return nnf.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)

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
