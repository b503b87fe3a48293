"""Rev-MViT: the multi-scale reversible Vision Transformer, for images and video.

Mangalam et al., "Reversible Vision Transformers", CVPR 2022 (https://arxiv.org/abs/2302.04869).
Faithful to the official SlowFast ``ReversibleMViT``: reversible runs of
:class:`~revvit_d2.modeling.reversible.ReversibleBlock` separated by non-reversible
:class:`StageTransitionBlock` s, which pool Q (and the residual, with the same conv), raise the
width inside their attention and merge the two streams (``pre_q_fusion``). Differences from the
official code: no config object, q/k/v always one fused Linear, eval returns logits, and
:meth:`RevMViT.forward_features` returns the per-stage features the official code does not have.
The SlowFast config keys that describe a Rev-MViT are read in :mod:`revvit_d2.official`.
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as nnf
from torch import nn

from .base import RevModelBase
from .layers import (
    AttentionSubBlock,
    MlpSubBlock,
    MultiScaleAttention,
    PatchEmbed,
    TwoStreamFusion,
    resize_pos_embed,
)
from .options import EngineOptions
from .replay import drop_path_mask
from .reversible import ReversibleBlock

__all__ = ["RevMViT", "StageTransitionBlock", "round_width", "mvit_pooling_schedule"]


def round_width(width: float, multiplier: float, min_width: int = 1, divisor: int = 1) -> int:
    """Channel rounding of the official MViT (multiply, round to a multiple of divisor)."""
    width *= multiplier
    min_width = min_width or divisor
    out = max(min_width, int(width + divisor / 2) // divisor * divisor)
    if out < 0.9 * width:
        out += divisor
    return int(out)


def mvit_pooling_schedule(depth, pool_q_stride=(), pool_kvq_kernel=None,
                          pool_kv_stride_adaptive=None, pool_kv_stride=()):
    """Per-layer (kernel_q, stride_q, kernel_kv, stride_kv), as the official MViT derives them.

    ``pool_q_stride`` / ``pool_kv_stride`` are lists of ``[layer, sT, sH, sW]``. With
    ``pool_kv_stride_adaptive`` the KV stride starts at that value and is divided (floored at 1)
    by the Q stride at every Q-pooling layer. Without an explicit kernel a stride s > 1 gets
    kernel s + 1.
    """
    stride_q = [None] * depth
    for entry in pool_q_stride:
        stride_q[int(entry[0])] = tuple(int(s) for s in entry[1:])
    if pool_kv_stride_adaptive is not None:
        kv = [int(s) for s in pool_kv_stride_adaptive]
        pool_kv_stride = []
        for i in range(depth):
            if stride_q[i] is not None:
                kv = [max(kv[d] // stride_q[i][d], 1) for d in range(len(kv))]
            pool_kv_stride.append([i] + kv)
    stride_kv = [None] * depth
    for entry in pool_kv_stride:
        stride_kv[int(entry[0])] = tuple(int(s) for s in entry[1:])

    def kernel(stride):
        if pool_kvq_kernel is not None:
            return tuple(int(k) for k in pool_kvq_kernel)
        return tuple(s + 1 if s > 1 else s for s in stride)

    out = []
    for i in range(depth):
        sq, skv = stride_q[i], stride_kv[i]
        out.append((
            kernel(sq) if sq else (1, 1, 1), sq or (1, 1, 1),
            kernel(skv) if skv else (1, 1, 1), skv or (1, 1, 1),
        ))
    return out


class StageTransitionBlock(nn.Module):
    """Non-reversible block between reversible runs: merges the two streams, pools Q, changes
    the width. ``x = DP(y + G(y))`` with ``y = pool_q(res_proj(u)) + F(u)``, ``u = fuse(x)``.

    Args:
        dim (int): width C of each incoming stream (the input is their 2C concatenation).
        dim_out (int): output width.
        num_heads (int): attention heads (of dim_out).
        pre_q_fusion (str): :class:`TwoStreamFusion` mode for the two incoming streams.
        kernel_q, stride_q, kernel_kv, stride_kv: pooling (T, H, W).
        mlp_ratio, qkv_bias, drop_path_rate, proj_drop: as in the reversible blocks. Drop path
            zeroes the whole output of a dropped sample, as the official code does.
    """

    def __init__(self, dim, dim_out, num_heads, pre_q_fusion="avg", kernel_q=(1, 1, 1),
                 stride_q=(1, 1, 1), kernel_kv=(1, 1, 1), stride_kv=(1, 1, 1), mlp_ratio=4.0,
                 qkv_bias=True, drop_path_rate=0.0, proj_drop=0.0):
        super().__init__()
        self.pre_q_fuse = TwoStreamFusion(pre_q_fusion, 2 * dim)
        dim_in = dim if self.pre_q_fuse.halves_width else 2 * dim
        self.drop_path_rate = float(drop_path_rate)
        self.F = _TransitionAttention(dim_in, dim_out, num_heads, qkv_bias, kernel_q, stride_q,
                                      kernel_kv, stride_kv, proj_drop)
        self.G = MlpSubBlock(dim_out, mlp_ratio)
        self.res_proj = nn.Linear(dim_in, dim_out) if dim_in != dim_out else None
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor, thw: Sequence[int]):
        """x: (B, N, 2C) two concatenated streams -> ((B, N', dim_out), thw')."""
        x = self.pre_q_fuse(x)
        res = self.res_proj(x) if self.res_proj is not None else x
        B, N, C = res.shape
        res = res.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)
        res, _ = self.F.attn.pool_q_tokens(res, thw)  # same conv + norm as the Q pooling
        res = res.transpose(1, 2).reshape(B, -1, C)
        attn, thw = self.F(x, thw)
        x = res + attn
        x = x + self.G(x)
        mask = drop_path_mask(x, self.drop_path_rate, self.training)
        return (x if mask is None else x * mask), thw


class _TransitionAttention(nn.Module):
    """F of a stage transition: ``attn(norm(x))`` with Q pooling; returns the new grid too."""

    def __init__(self, dim, dim_out, num_heads, qkv_bias, kernel_q, stride_q, kernel_kv,
                 stride_kv, proj_drop):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, qkv_bias, kernel_q, kernel_kv,
                                        stride_q, stride_kv, proj_drop)

    def forward(self, x, thw):
        return self.attn(self.norm(x), thw)


class RevMViT(RevModelBase):
    """Reversible multi-scale ViT (no class token, mean pooling over the concatenated streams).

    ::

        input ─ patch stem ─ + pos ─ [run: rev blocks] ─ transition ─ [run] ─ ... ─ [run] ─ cat ─
              LN(2C) ─ mean ─ head
        each run:  x ─┬─ X1 ─┐ ┌───────────────┐ ┌─ Y1 ─┐
                      └─ X2 ─┘ │ rev block x k │ └─ Y2 ─┴─ cat (2C) ─> next transition / head
        a transition: 2C ─ pre-Q fusion ─ Q-pooled attention (C -> C') + pooled residual ─ MLP

    Args:
        input_size (tuple): training input size, (H, W) for images or (T, H, W) for video;
            defines the position-embedding grid.
        patch_kernel, patch_stride, patch_padding: patch stem, 2-D or 3-D (matching input_size).
        in_chans (int): input channels.
        embed_dim (int): width after the stem.
        depth (int): number of layers (reversible blocks and transitions together).
        num_heads (int): heads of the first layer.
        mlp_ratio (float), qkv_bias (bool): as in ViT.
        dim_mul, head_mul: lists of ``[layer, multiplier]``.
        pool_q_stride: list of ``[layer, sT, sH, sW]``; these layers must be the transitions.
        pool_kvq_kernel (3-tuple): pooling kernel, or None for stride + 1.
        pool_kv_stride_adaptive (3-tuple): initial KV stride (divided at each Q pooling).
        pool_kv_stride: explicit ``[layer, sT, sH, sW]`` list (used without the adaptive one).
        transition_layers: indices of the :class:`StageTransitionBlock` s (official
            ``MVIT.REV.BUFFER_LAYERS``).
        pre_q_fusion (str): stream merge at the transitions ("avg", "concat_linear_2", ...).
        sep_pos_embed (bool): separable (spatial + temporal) position embedding.
        drop_path_rate, dropout_rate, head_dropout_rate, num_classes, fuse: as in
            :class:`~revvit_d2.modeling.rev_vit.RevViT`.
        use_rev_backprop, act_checkpoint, parallel_backward, rev_anchor_every, check_finite,
        compile_blocks, stored_blocks, rev_backward_chunk: the engine's settings, kept as
            ``self.engine``
            (:class:`~revvit_d2.modeling.options.EngineOptions`). ``act_checkpoint`` wraps the
            reversible blocks, not the transitions; ``compile_blocks`` compiles the reversible
            blocks' F and G, the transitions stay eager.
    """

    def __init__(
        self,
        input_size=(224, 224),
        patch_kernel=(7, 7),
        patch_stride=(4, 4),
        patch_padding=(3, 3),
        in_chans=3,
        embed_dim=96,
        depth=16,
        num_heads=1,
        mlp_ratio=4.0,
        qkv_bias=True,
        dim_mul=((1, 2.0), (3, 2.0), (14, 2.0)),
        head_mul=((1, 2.0), (3, 2.0), (14, 2.0)),
        pool_q_stride=((1, 1, 2, 2), (3, 1, 2, 2), (14, 1, 2, 2)),
        pool_kvq_kernel=(1, 3, 3),
        pool_kv_stride_adaptive=(1, 4, 4),
        pool_kv_stride=(),
        transition_layers=(1, 3, 14),
        pre_q_fusion="concat_linear_2",
        sep_pos_embed=False,
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
    ):
        super().__init__()
        input_size = tuple(int(s) for s in input_size)
        if len(patch_kernel) != len(input_size):
            raise ValueError(f"patch_kernel {patch_kernel} does not match input_size {input_size}")
        transition_layers = _checked_transitions(depth, transition_layers, pool_q_stride, dim_mul)
        self.engine = EngineOptions(
            use_rev_backprop=use_rev_backprop, act_checkpoint=act_checkpoint,
            parallel_backward=parallel_backward, rev_anchor_every=rev_anchor_every,
            check_finite=check_finite, compile_blocks=compile_blocks,
            stored_blocks=stored_blocks, rev_backward_chunk=rev_backward_chunk)
        self.is_video = len(input_size) == 3
        self.input_size = input_size
        self.sep_pos_embed = sep_pos_embed

        self._build_stem(in_chans, embed_dim, patch_kernel, patch_stride, patch_padding,
                         dropout_rate)
        stem_stride = tuple(patch_stride) if self.is_video else (1,) + tuple(patch_stride)
        width = self._build_layers(
            depth, embed_dim, num_heads, mlp_ratio, qkv_bias, dim_mul, head_mul,
            mvit_pooling_schedule(depth, pool_q_stride, pool_kvq_kernel,
                                  pool_kv_stride_adaptive, pool_kv_stride),
            transition_layers, pre_q_fusion, drop_path_rate, dropout_rate, stem_stride)
        self._build_head(width, fuse, dropout_rate, head_dropout_rate, num_classes)

        for name in self.pos_embed_grids:
            nn.init.trunc_normal_(getattr(self, name), std=0.02)
        self._finish_init()

    def _build_stem(self, in_chans, embed_dim, patch_kernel, patch_stride, patch_padding,
                    dropout_rate):
        """Patch embedding, position embedding(s) of the training grid, and their dropout."""
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_kernel, patch_stride,
                                      patch_padding, conv_2d=not self.is_video)
        grid = self._stem_grid(self.input_size, patch_kernel, patch_stride, patch_padding)
        self.patch_grid = grid  # (T, H, W) tokens at the training size
        if self.sep_pos_embed:
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, grid[1] * grid[2], embed_dim))
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, grid[0], embed_dim))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(grid), embed_dim))
        self.pos_drop = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()

    def _build_layers(self, depth, dim, heads, mlp_ratio, qkv_bias, dim_mul, head_mul, pooling,
                      transition_layers, pre_q_fusion, drop_path_rate, dropout_rate, stride):
        """``self.blocks`` (reversible blocks and transitions) and, per stage, the index of its
        last reversible block, its output width 2C and its stride. Returns the final C."""
        dim_mul_at = {int(i): float(m) for i, m in dim_mul}
        head_mul_at = {int(i): float(m) for i, m in head_mul}
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList()
        self.stage_ends: List[int] = []  # index of the last reversible block of each stage
        self.stage_channels: List[int] = []  # 2C of each stage's output
        self.stage_strides: List[Tuple[int, int, int]] = []
        stride = tuple(int(s) for s in stride)
        for i in range(depth):
            heads = round_width(heads, head_mul_at.get(i, 1.0))
            dim_out = round_width(dim, dim_mul_at.get(i, 1.0))
            kq, sq, kkv, skv = pooling[i]
            if i in transition_layers:
                self.stage_ends.append(i - 1)
                self.stage_channels.append(2 * dim)
                self.stage_strides.append(stride)
                self.blocks.append(StageTransitionBlock(
                    dim, dim_out, heads, pre_q_fusion, kq, sq, kkv, skv, mlp_ratio, qkv_bias,
                    dpr[i], dropout_rate))
                stride = tuple(a * b for a, b in zip(stride, sq))
            else:
                if sq != (1, 1, 1):
                    raise ValueError(f"layer {i} pools Q but is not a transition layer")
                self.blocks.append(ReversibleBlock(
                    AttentionSubBlock(dim, heads, qkv_bias, kkv, skv, proj_drop=dropout_rate),
                    MlpSubBlock(dim, mlp_ratio), drop_path_rate=dpr[i]))
            dim = dim_out
        self.stage_ends.append(depth - 1)
        self.stage_channels.append(2 * dim)
        self.stage_strides.append(stride)
        return dim

    @staticmethod
    def _stem_grid(size, kernel, stride, padding) -> Tuple[int, int, int]:
        grid = tuple((s + 2 * p - k) // st + 1 for s, k, st, p in zip(size, kernel, stride, padding))
        return grid if len(grid) == 3 else (1,) + grid

    @property
    def feature_names(self) -> List[str]:
        """``scale2``.. one per stage (scale k has stride 2^k in H and W for the official
        stems)."""
        return [f"scale{k + 2}" for k in range(len(self.stage_ends))]

    @property
    def feature_strides(self) -> Dict[str, int]:
        return {n: s[-1] for n, s in zip(self.feature_names, self.stage_strides)}

    @property
    def feature_channels(self) -> Dict[str, int]:
        return dict(zip(self.feature_names, self.stage_channels))

    @property
    def pos_embed_grids(self):
        if self.sep_pos_embed:
            return {"pos_embed_spatial": self.patch_grid[1:], "pos_embed_temporal": self.patch_grid[:1]}
        return {"pos_embed": self.patch_grid if self.is_video else self.patch_grid[1:]}

    def _pos_embed(self, thw: Tuple[int, int, int]) -> torch.Tensor:
        # Another input size: the learned table is interpolated (bicubic in space, linear in
        # time, trilinear for a joint video table); documented in docs/models.md.
        T, H, W = thw
        if self.sep_pos_embed:
            spatial = resize_pos_embed(self.pos_embed_spatial, self.patch_grid[1:], (H, W))
            temporal = self.pos_embed_temporal
            if T != self.patch_grid[0]:
                temporal = nnf.interpolate(temporal.transpose(1, 2), size=T, mode="linear",
                                           align_corners=False).transpose(1, 2)
            # token (t, s): spatial[s] + temporal[t]
            return spatial.repeat(1, T, 1) + temporal.repeat_interleave(H * W, dim=1)
        if self.is_video:
            return resize_pos_embed(self.pos_embed, self.patch_grid, thw)
        return resize_pos_embed(self.pos_embed, self.patch_grid[1:], (H, W))

    def _stages(self, x: torch.Tensor):
        """Yield (2C tokens, thw) at the end of every stage."""
        expected = 5 if self.is_video else 4
        if x.ndim != expected:
            layout = "(B, C, T, H, W)" if self.is_video else "(B, C, H, W)"
            raise ValueError(f"RevMViT expects {layout} input, got shape {tuple(x.shape)}")
        x, thw = self.patch_embed(x)  # (B, N, C)
        x = self.pos_drop(x + self._pos_embed(thw))
        start, x2c = 0, None
        for end in self.stage_ends:
            if start > 0:  # the transition that opens this stage: 2C -> C'
                x, thw = self.blocks[start](x2c, thw)
                start += 1
            run = self.blocks[start:end + 1]
            names = [f"blocks.{i}" for i in range(start, end + 1)]
            y1, y2 = self._run(run, x, x, thw, names)
            x2c = torch.cat([y1, y2], dim=-1)
            if self.engine.check_finite and not torch.isfinite(x2c).all():
                raise FloatingPointError(f"non-finite values after {names[-1]}")
            yield x2c, thw
            start = end + 1

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> tokens (B, N_last, 2C_last) of the two concatenated final streams."""
        out = None
        for out, _ in self._stages(x):
            pass
        return self.stack_drop(out)

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Input -> {"scale2": ..., "scale5": ...}: each stage's two streams, normalised (see
        :meth:`_level_output`), laid out (B, C, H, W) for images or (B, C, T, H, W) for video."""
        feats = {}
        names = self.feature_names
        for k, (tokens, (T, H, W)) in enumerate(self._stages(x)):
            y = self._level_output(names[k], tokens, last=k == len(names) - 1)
            B, _, C = y.shape
            y = y.transpose(1, 2)
            feats[names[k]] = y.reshape(B, C, T, H, W) if self.is_video else y.reshape(B, C, H, W)
        return feats

    def _level_output(self, name: str, tokens: torch.Tensor, last: bool) -> torch.Tensor:
        """(B, N, 2C) stage tokens -> normalised tokens: the last stage through the classifier's
        final norm and fusion, the others by a LayerNorm without affine parameters. (The
        Detectron2 backbone gives each returned level a learned norm instead.)"""
        if last:
            return self.fuse_and_norm(self.stack_drop(tokens))
        return nnf.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) or (B, 3, T, H, W) -> logits (B, num_classes); never softmax."""
        return self.forward_head(self.forward_tokens(x))


def _checked_transitions(depth, transition_layers, pool_q_stride, dim_mul) -> List[int]:
    """The sorted transition layers, after checking that they are exactly the layers that pool
    Q or change the width, and that none is the first, the last or next to another."""
    transition_layers = sorted(int(i) for i in transition_layers)
    q_layers = sorted(int(e[0]) for e in pool_q_stride)
    mul_layers = sorted({int(e[0]) for e in dim_mul})
    if set(q_layers) | set(mul_layers) != set(transition_layers):
        raise ValueError(f"transition_layers {transition_layers} must be exactly the layers "
                         f"with Q pooling {q_layers} or a width change {mul_layers}")
    if transition_layers and (transition_layers[0] == 0 or transition_layers[-1] == depth - 1
                              or any(b - a == 1 for a, b in zip(transition_layers,
                                                                 transition_layers[1:]))):
        raise ValueError("transitions cannot be the first or last layer, nor adjacent: "
                         f"{transition_layers}")
    return transition_layers
