"""Reversible video transformers in PyTorchVideo's style: builder functions that assemble a
trunk and a pytorchvideo head into :class:`RevVideoNet`.

Mangalam et al., "Reversible Vision Transformers", CVPR 2022 (https://arxiv.org/abs/2302.04869).

::

    clip (B, 3, T, H, W)
      ─ trunk: revvit_d2 RevMViT (num_classes=0)
          3-D patch stem ─ + pos (separable) ─ reversible stages [─ transition ─ ...] ─
          cat(two streams) ─ LayerNorm(2C) ─ mean over tokens                  -> (B, 2C)
      ─ head: pytorchvideo VisionTransformerBasicHead
          (create_vit_basic_head, seq_pool_type="none") : Dropout ─ Linear     -> logits (B, K)

The trunk is the core :class:`~revvit_d2.modeling.rev_mvit.RevMViT` unchanged, so its parameter
names are those of ``revvit_d2.create_model("rev_mvit_b_16x4")`` under ``trunk.``; the head's
Linear is ``head.proj``. Official checkpoints load strictly through
:func:`revvit_video.hub.load_video_checkpoint`. ``head=None`` gives a feature extractor returning
the pooled (B, 2C) features. The forward always returns logits (no softmax, also in eval mode).
"""
import inspect
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from pytorchvideo.models.head import create_vit_basic_head

from revvit_d2.modeling import RevMViT, get_model_kwargs
from revvit_d2.modeling.layers import init_official_weights

__all__ = ["RevVideoNet", "create_rev_mvit", "create_rev_vit_video", "video_builder_kwargs"]

# RevMViT arguments that the builders name differently, and those the builders set themselves.
_RENAMED = {"in_chans": "input_channels", "num_classes": "head_num_classes"}
_NOT_EXPOSED = ("pool_kv_stride", "fuse")


def video_builder_kwargs(variant: str) -> Dict[str, Any]:
    """:func:`create_rev_mvit` arguments of a revvit_d2 video variant (e.g. ``rev_mvit_b_16x4``):
    the dimensions pinned in the variant registry, completed with ``RevMViT``'s defaults.

    The registry is the one source of the dimensions: the builder's defaults and the hub
    entry points are derived from it here.
    """
    defaults = {k: p.default for k, p in inspect.signature(RevMViT).parameters.items()}
    pinned = get_model_kwargs(variant)
    kwargs = dict(defaults, **pinned)
    T, H, W = kwargs.pop("input_size")
    if H != W:
        raise ValueError(f"{variant}: the video builders take a square spatial size, got {H}x{W}")
    for key in _NOT_EXPOSED:
        value = kwargs.pop(key)
        if value != defaults[key]:
            raise ValueError(f"{variant} pins {key}={value!r}, which create_rev_mvit cannot set")
    out = {_RENAMED.get(k, k): v for k, v in kwargs.items()}
    out.update(spatial_size=int(H), temporal_size=int(T))
    return out


_B16X4 = video_builder_kwargs("rev_mvit_b_16x4")


class RevVideoNet(nn.Module):
    """A video classifier made of built parts (pytorchvideo's ``Net`` pattern).

    The builders are :func:`create_rev_mvit` and :func:`create_rev_vit_video`.

    Args:
        trunk (nn.Module): (B, 3, T, H, W) -> pooled features (B, D); a ``RevMViT`` with
            ``num_classes=0``.
        head (nn.Module or None): (B, D) -> (B, K) logits; None returns the features.
    """

    def __init__(self, *, trunk: nn.Module, head: Optional[nn.Module] = None):
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(x)  # (B, 3, T, H, W) -> (B, D)
        if self.head is not None:
            x = self.head(x)  # (B, D) -> (B, K) logits
        return x


def _head(head: Optional[Callable[..., nn.Module]], in_features: int, num_classes: int,
          dropout_rate: float, activation) -> Optional[nn.Module]:
    if head is None or num_classes <= 0:
        return None
    module = head(in_features=in_features, out_features=num_classes, seq_pool_type="none",
                  dropout_rate=dropout_rate, activation=activation)
    module.apply(init_official_weights)  # as the official head: trunc-normal 0.02, bias 0.02
    return module


def create_rev_mvit(
    *,
    # Input.
    spatial_size: int = _B16X4["spatial_size"],
    temporal_size: int = _B16X4["temporal_size"],
    input_channels: int = _B16X4["input_channels"],
    # Patch stem.
    patch_kernel: Sequence[int] = _B16X4["patch_kernel"],
    patch_stride: Sequence[int] = _B16X4["patch_stride"],
    patch_padding: Sequence[int] = _B16X4["patch_padding"],
    sep_pos_embed: bool = _B16X4["sep_pos_embed"],
    # Reversible trunk.
    embed_dim: int = _B16X4["embed_dim"],
    depth: int = _B16X4["depth"],
    num_heads: int = _B16X4["num_heads"],
    mlp_ratio: float = _B16X4["mlp_ratio"],
    qkv_bias: bool = _B16X4["qkv_bias"],
    dim_mul: Sequence[Tuple[int, float]] = _B16X4["dim_mul"],
    head_mul: Sequence[Tuple[int, float]] = _B16X4["head_mul"],
    pool_q_stride: Sequence[Sequence[int]] = _B16X4["pool_q_stride"],
    pool_kvq_kernel: Optional[Sequence[int]] = _B16X4["pool_kvq_kernel"],
    pool_kv_stride_adaptive: Optional[Sequence[int]] = _B16X4["pool_kv_stride_adaptive"],
    transition_layers: Sequence[int] = _B16X4["transition_layers"],
    pre_q_fusion: str = _B16X4["pre_q_fusion"],
    drop_path_rate: float = _B16X4["drop_path_rate"],
    dropout_rate: float = _B16X4["dropout_rate"],
    # Engine (revvit_d2.modeling.EngineOptions).
    use_rev_backprop: bool = True,
    act_checkpoint: bool = False,
    parallel_backward: bool = False,
    rev_anchor_every: int = 0,
    check_finite: bool = False,
    compile_blocks: bool = False,
    stored_blocks: int = 0,
    rev_backward_chunk: int = 0,
    # Head.
    head: Optional[Callable[..., nn.Module]] = create_vit_basic_head,
    head_num_classes: int = _B16X4["head_num_classes"],
    head_dropout_rate: float = _B16X4["head_dropout_rate"],
    head_activation: Optional[Callable[..., nn.Module]] = None,
) -> RevVideoNet:
    """Build a Rev-MViT video classifier. The defaults are revvit_d2's ``rev_mvit_b_16x4``
    variant, the official REV_MVIT_B_16x4 (Kinetics-400, 16 x 224 x 224 input, 34,963,120
    parameters); :func:`video_builder_kwargs` gives the arguments of any video variant.

    Args:
        spatial_size (int): training crop side; with ``temporal_size`` it fixes the position
            embedding grid (other input sizes are interpolated).
        temporal_size (int): frames per clip.
        input_channels (int): 3 for RGB.
        patch_kernel, patch_stride, patch_padding: 3-D stem (T, H, W).
        sep_pos_embed (bool): separable spatial + temporal position embeddings.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: trunk width, layers (reversible
            blocks and transitions), heads of the first stage.
        dim_mul, head_mul: ``[layer, multiplier]`` lists; pool_q_stride: ``[layer, sT, sH, sW]``;
            pool_kvq_kernel: pooling kernel; pool_kv_stride_adaptive: first KV stride;
            transition_layers: the non-reversible stage transitions (official
            ``MVIT.REV.BUFFER_LAYERS``); pre_q_fusion: how transitions merge the two streams.
        drop_path_rate (float): stochastic depth, linear over the layers.
        dropout_rate (float): dropout inside the trunk.
        use_rev_backprop (bool): reversible (activation-free) backward; False is plain autograd.
        act_checkpoint (bool): with ``use_rev_backprop=False``, activation checkpointing of each
            reversible block (``torch.utils.checkpoint``); the stage transitions are not
            checkpointed.
        parallel_backward, rev_anchor_every, check_finite, compile_blocks, stored_blocks,
            rev_backward_chunk: the other engine
            options (:class:`revvit_d2.modeling.EngineOptions` documents each).
        head (callable): builds the head from ``in_features, out_features, seq_pool_type,
            dropout_rate, activation`` (pytorchvideo's ``create_vit_basic_head``); None for a
            feature extractor.
        head_num_classes (int): classes K (0 for no head).
        head_dropout_rate (float): dropout before the projection (official 0.5).
        head_activation (callable): None returns logits (used for training and testing here).

    Example::

        model = create_rev_mvit()                      # REV_MVIT_B_16x4, random weights
        logits = model(torch.randn(1, 3, 16, 224, 224))  # (1, 400)
    """
    trunk = RevMViT(
        input_size=(int(temporal_size), int(spatial_size), int(spatial_size)),
        patch_kernel=tuple(patch_kernel), patch_stride=tuple(patch_stride),
        patch_padding=tuple(patch_padding), in_chans=input_channels, embed_dim=embed_dim,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
        dim_mul=dim_mul, head_mul=head_mul, pool_q_stride=pool_q_stride,
        pool_kvq_kernel=pool_kvq_kernel, pool_kv_stride_adaptive=pool_kv_stride_adaptive,
        transition_layers=transition_layers, pre_q_fusion=pre_q_fusion,
        sep_pos_embed=sep_pos_embed, drop_path_rate=drop_path_rate, dropout_rate=dropout_rate,
        num_classes=0, use_rev_backprop=use_rev_backprop, act_checkpoint=act_checkpoint,
        parallel_backward=parallel_backward, rev_anchor_every=rev_anchor_every,
        check_finite=check_finite, compile_blocks=compile_blocks, stored_blocks=stored_blocks,
        rev_backward_chunk=rev_backward_chunk,
    )
    return RevVideoNet(trunk=trunk, head=_head(head, trunk.num_features, head_num_classes,
                                               head_dropout_rate, head_activation))


def create_rev_vit_video(
    *,
    spatial_size: int = 224,
    temporal_size: int = 16,
    input_channels: int = 3,
    patch_size: Sequence[int] = (2, 16, 16),
    sep_pos_embed: bool = True,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    drop_path_rate: float = 0.1,
    dropout_rate: float = 0.0,
    use_rev_backprop: bool = True,
    act_checkpoint: bool = False,
    parallel_backward: bool = False,
    rev_anchor_every: int = 0,
    check_finite: bool = False,
    compile_blocks: bool = False,
    stored_blocks: int = 0,
    rev_backward_chunk: int = 0,
    head: Optional[Callable[..., nn.Module]] = create_vit_basic_head,
    head_num_classes: int = 400,
    head_dropout_rate: float = 0.5,
    head_activation: Optional[Callable[..., nn.Module]] = None,
) -> RevVideoNet:
    """Build an isotropic Rev-ViT for video: a non-overlapping 3-D patch stem (``2 x 16 x 16`` by
    default, 8 x 14 x 14 tokens for 16 x 224 x 224) and ``depth`` reversible blocks of global
    attention, no pooling and no stage transitions (a single reversible run of
    :class:`~revvit_d2.modeling.rev_mvit.RevMViT`, which is what the official code does for
    Rev-ViT too). There is no official video Rev-ViT checkpoint; the defaults are Rev-ViT-B's
    widths with ViViT / MViT-style tubelets.

    Args:
        patch_size (3 ints): tubelet (T, H, W); kernel = stride, no padding.
        other arguments: as in :func:`create_rev_mvit`.
    """
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3:
        raise ValueError(f"patch_size must be (T, H, W), got {patch_size}")
    trunk = RevMViT(
        input_size=(int(temporal_size), int(spatial_size), int(spatial_size)),
        patch_kernel=patch, patch_stride=patch, patch_padding=(0, 0, 0),
        in_chans=input_channels, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, dim_mul=(), head_mul=(), pool_q_stride=(),
        pool_kvq_kernel=None, pool_kv_stride_adaptive=None, pool_kv_stride=(),
        transition_layers=(), sep_pos_embed=sep_pos_embed, drop_path_rate=drop_path_rate,
        dropout_rate=dropout_rate, num_classes=0, use_rev_backprop=use_rev_backprop,
        act_checkpoint=act_checkpoint, parallel_backward=parallel_backward,
        rev_anchor_every=rev_anchor_every, check_finite=check_finite,
        compile_blocks=compile_blocks, stored_blocks=stored_blocks,
        rev_backward_chunk=rev_backward_chunk,
    )
    return RevVideoNet(trunk=trunk, head=_head(head, trunk.num_features, head_num_classes,
                                               head_dropout_rate, head_activation))
