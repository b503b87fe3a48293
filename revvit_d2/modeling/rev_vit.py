"""Rev-ViT: the isotropic reversible Vision Transformer.

Mangalam et al., "Reversible Vision Transformers", CVPR 2022 (https://arxiv.org/abs/2302.04869).
Faithful to the official SlowFast model (``MViT`` with ``MVIT.REV.ENABLE`` and no pooling): same
arithmetic, same initialisation; official checkpoints load through
:func:`revvit_d2.convert_slowfast_state_dict`. Differences: the head returns logits in eval mode
too (the official head applies softmax in eval), q/k/v are one fused Linear, and the global RNG
is never re-seeded.
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as nnf
from torch import nn

from .base import RevModelBase
from .layers import AttentionSubBlock, MlpSubBlock, PatchEmbed, resize_pos_embed
from .options import EngineOptions
from .reversible import ReversibleBlock

__all__ = ["RevViT"]


class RevViT(RevModelBase):
    """Reversible ViT (no class token, mean pooling over the concatenated streams).

    ::

        image ─ patch embed ─ + pos ─┬─ X1 ─┐ ┌──────────────┐ ┌─ Y1 ─┐
                                      │      ├─┤ rev block x L ├─┤      ├─ cat ─ LN(2C) ─ mean ─ head
                                      └─ X2 ─┘ └──────────────┘ └─ Y2 ─┘

    Args:
        img_size (int or tuple): training image size; defines the position-embedding grid.
        patch_size (int): patch size and stride of the stem.
        in_chans (int): input channels.
        embed_dim (int): width C of each stream.
        depth (int): number of reversible blocks.
        num_heads (int): attention heads.
        mlp_ratio (float): MLP hidden width / C.
        qkv_bias (bool): bias on the qkv projection.
        drop_path_rate (float): stochastic depth, linear from 0 to this over the blocks.
        dropout_rate (float): dropout after the position embedding, after each attention
            projection and on the stack output (official ``MVIT.DROPOUT_RATE``).
        head_dropout_rate (float): dropout before the classifier (``MODEL.DROPOUT_RATE``).
        num_classes (int): classes; 0 builds no head and ``forward`` returns pooled features.
        fuse (str): how the two streams are merged at the end (:class:`TwoStreamFusion`).
        use_rev_backprop, act_checkpoint, parallel_backward, rev_anchor_every, check_finite,
        compile_blocks, stored_blocks, rev_backward_chunk: the engine's settings, kept as
            ``self.engine``
            (:class:`~revvit_d2.modeling.options.EngineOptions`, which documents each).
        pos_embed_interp (str): interpolation used when the input grid differs from the
            training grid ("bicubic").
        window_size (int): if > 0, blocks not in ``global_block_indexes`` attend within windows
            of this many tokens per side (ViTDet); still reversible (F stays a function of X2).
        global_block_indexes (sequence): blocks with global attention when windows are used.
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.0,
        dropout_rate=0.0,
        head_dropout_rate=0.0,
        num_classes=1000,
        fuse="concat",
        use_rev_backprop=True,
        act_checkpoint=False,
        parallel_backward=False,
        rev_anchor_every=0,
        check_finite=False,
        compile_blocks=False,
        stored_blocks=0,
        rev_backward_chunk=0,
        pos_embed_interp="bicubic",
        window_size=0,
        global_block_indexes=(),
    ):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        for s in img_size:
            if s % patch_size:
                raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.engine = EngineOptions(
            use_rev_backprop=use_rev_backprop, act_checkpoint=act_checkpoint,
            parallel_backward=parallel_backward, rev_anchor_every=rev_anchor_every,
            check_finite=check_finite, compile_blocks=compile_blocks,
            stored_blocks=stored_blocks, rev_backward_chunk=rev_backward_chunk)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.pos_embed_interp = pos_embed_interp
        self.patch_grid = (img_size[0] // patch_size, img_size[1] // patch_size)

        self.patch_embed = PatchEmbed(in_chans, embed_dim, (patch_size,) * 2, (patch_size,) * 2,
                                      (0, 0), conv_2d=True)
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.patch_grid), embed_dim))
        self.pos_drop = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()

        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            ReversibleBlock(
                AttentionSubBlock(embed_dim, num_heads, qkv_bias=qkv_bias, proj_drop=dropout_rate,
                                  window_size=0 if i in global_block_indexes else window_size),
                MlpSubBlock(embed_dim, mlp_ratio),
                drop_path_rate=dpr[i],
            )
            for i in range(depth)
        )
        self._build_head(embed_dim, fuse, dropout_rate, head_dropout_rate, num_classes)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self._finish_init()

    @property
    def block_names(self) -> List[str]:
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def _pos_embed(self, grid: Tuple[int, int]) -> torch.Tensor:
        # A different input size is handled by interpolating the learned embedding (documented
        # in docs/models.md); the stored parameter is never changed.
        return resize_pos_embed(self.pos_embed, self.patch_grid, grid, self.pos_embed_interp)

    def _embed(self, x: torch.Tensor):
        H, W = x.shape[-2:]
        if x.ndim != 4 or H % self.patch_size or W % self.patch_size:
            raise ValueError(
                f"RevViT expects (B, C, H, W) with H and W multiples of the patch size "
                f"{self.patch_size}; got shape {tuple(x.shape)}")
        x, thw = self.patch_embed(x)  # (B, N, C)
        return self.pos_drop(x + self._pos_embed(thw[1:])), thw

    def _run_blocks(self, x1, x2, thw, start: int, end: int):
        return self._run(self.blocks[start:end], x1, x2, thw, self.block_names[start:end])

    def forward_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
        """(B, 3, H, W) -> tokens (B, N, 2C) of the two concatenated streams, and the grid."""
        x, thw = self._embed(x)
        y1, y2 = self._run_blocks(x, x, thw, 0, len(self.blocks))
        return self.stack_drop(torch.cat([y1, y2], dim=-1)), thw

    def forward_features(self, x: torch.Tensor,
                         block_indices: Sequence[int] = ()) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {"last_feat": (B, num_features, H/16, W/16)}: normalised, fused
        streams laid out NCHW at stride ``patch_size``.

        ``block_indices``: also return ``"block{i}"`` (B, 2C, H/16, W/16), the two streams after
        block i, normalised without affine parameters. The reversible run is split at those
        blocks (each piece keeps the memory-saving backward).
        """
        x, (_, h, w) = self._embed(x)
        thw = (1, h, w)
        cuts = sorted({int(i) + 1 for i in block_indices} | {len(self.blocks)})
        if cuts[0] < 1 or cuts[-1] > len(self.blocks):
            raise ValueError(f"block_indices must lie in [0, {len(self.blocks) - 1}]")
        feats, x1, x2, start = {}, x, x, 0
        for end in cuts:
            x1, x2 = self._run_blocks(x1, x2, thw, start, end)
            if end - 1 in block_indices:
                t = torch.cat([x1, x2], dim=-1)
                t = nnf.layer_norm(t, t.shape[-1:], eps=1e-6)
                feats[f"block{end - 1}"] = t.transpose(1, 2).reshape(t.shape[0], -1, h, w)
            start = end
        tokens = self.stack_drop(torch.cat([x1, x2], dim=-1))
        feat = self.fuse_and_norm(tokens)  # (B, N, num_features)
        feats["last_feat"] = feat.transpose(1, 2).reshape(feat.shape[0], -1, h, w)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes); never softmax."""
        tokens, _ = self.forward_tokens(x)
        return self.forward_head(tokens)
