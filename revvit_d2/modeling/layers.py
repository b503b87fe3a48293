"""Building blocks shared by Rev-ViT and Rev-MViT (plain torch, explicit arguments)."""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as nnf
from torch import nn

__all__ = [
    "PatchEmbed",
    "MultiScaleAttention",
    "AttentionSubBlock",
    "MlpSubBlock",
    "Mlp",
    "TwoStreamFusion",
    "resize_pos_embed",
    "init_official_weights",
]


def _triple(x, name: str) -> Tuple[int, int, int]:
    x = tuple(int(v) for v in x) if isinstance(x, (list, tuple)) else (int(x),) * 3
    if len(x) != 3:
        raise ValueError(f"{name} must have 3 entries (T, H, W), got {x}")
    return x


class PatchEmbed(nn.Module):
    """Convolutional patch stem: 2-D for images, 3-D for video.

    Args:
        in_chans (int): input channels.
        embed_dim (int): output channels.
        kernel_size, stride, padding: (kH, kW) for 2-D, (kT, kH, kW) for 3-D.
        conv_2d (bool): use Conv2d (images, input (B, C, H, W)) instead of Conv3d (video,
            input (B, C, T, H, W)).
    """

    def __init__(self, in_chans=3, embed_dim=768, kernel_size=(16, 16), stride=(16, 16),
                 padding=(0, 0), conv_2d=True):
        super().__init__()
        conv = nn.Conv2d if conv_2d else nn.Conv3d
        self.conv_2d = conv_2d
        self.proj = conv(in_chans, embed_dim, kernel_size=tuple(kernel_size),
                         stride=tuple(stride), padding=tuple(padding))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
        expected = 4 if self.conv_2d else 5
        if x.ndim != expected:
            layout = "(B, C, H, W)" if self.conv_2d else "(B, C, T, H, W)"
            raise ValueError(f"expected a {expected}-D input {layout}, got shape {tuple(x.shape)}")
        x = self.proj(x)
        if self.conv_2d:
            thw = (1,) + tuple(x.shape[-2:])
        else:
            thw = tuple(x.shape[-3:])
        # (B, C, [T,] H, W) -> (B, N, C), token index t*H*W + h*W + w
        return x.flatten(2).transpose(1, 2), thw


def _pool_tokens(x: torch.Tensor, pool: nn.Module, thw: Sequence[int], norm: Optional[nn.Module]):
    """Depthwise-conv pooling on the token grid. x: (B, heads, N, hd) -> (B, heads, N', hd)."""
    B, heads, N, hd = x.shape
    T, H, W = thw
    x = x.reshape(B * heads, T, H, W, hd).permute(0, 4, 1, 2, 3)
    x = pool(x)
    thw_out = tuple(x.shape[-3:])
    x = x.reshape(B, heads, hd, -1).transpose(2, 3)
    if norm is not None:
        x = norm(x)
    return x, thw_out


class MultiScaleAttention(nn.Module):
    """Multi-head attention with optional pooling of Q and K/V (MViT pooling attention).

    Without pooling it is ordinary ViT attention. Q/K/V come from one fused ``qkv`` Linear whose
    output is ``[q | k | v]``, each split into heads contiguously (the official separate q/k/v
    Linears are concatenated on load). Pooling is a depthwise Conv3d shared across heads on the
    (T, H, W) token grid followed by LayerNorm(head_dim); a pooling op exists unless its kernel and
    stride are both all ones, exactly as in the official code. Attention itself is
    ``scaled_dot_product_attention`` (scale head_dim^-0.5).

    Args:
        dim (int): input channels.
        dim_out (int): output channels (q/k/v project dim -> dim_out).
        num_heads (int): heads; head_dim = dim_out // num_heads.
        qkv_bias (bool): bias on the qkv projection.
        kernel_q, kernel_kv (3-tuple): pooling kernels (T, H, W).
        stride_q, stride_kv (3-tuple): pooling strides (T, H, W).
        proj_drop (float): dropout after the output projection.
        norm_eps (float): eps of the pooling LayerNorms.
    """

    def __init__(self, dim, dim_out=None, num_heads=8, qkv_bias=True, kernel_q=(1, 1, 1),
                 kernel_kv=(1, 1, 1), stride_q=(1, 1, 1), stride_kv=(1, 1, 1), proj_drop=0.0,
                 norm_eps=1e-6):
        super().__init__()
        dim_out = dim if dim_out is None else dim_out
        if dim_out % num_heads:
            raise ValueError(f"dim_out={dim_out} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim_out // num_heads
        self.dim_out = dim_out
        self.qkv = nn.Linear(dim, 3 * dim_out, bias=qkv_bias)
        self.proj = nn.Linear(dim_out, dim_out)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

        kernel_q, kernel_kv = _triple(kernel_q, "kernel_q"), _triple(kernel_kv, "kernel_kv")
        stride_q, stride_kv = _triple(stride_q, "stride_q"), _triple(stride_kv, "stride_kv")
        self.stride_q = stride_q
        hd = self.head_dim

        def make_pool(kernel, stride):
            if all(k == 1 for k in kernel) and all(s == 1 for s in stride):
                return None, None
            pad = tuple(k // 2 for k in kernel)
            conv = nn.Conv3d(hd, hd, kernel, stride=stride, padding=pad, groups=hd, bias=False)
            return conv, nn.LayerNorm(hd, eps=norm_eps)

        self.pool_q, self.norm_q = make_pool(kernel_q, stride_q)
        self.pool_k, self.norm_k = make_pool(kernel_kv, stride_kv)
        self.pool_v, self.norm_v = make_pool(kernel_kv, stride_kv)

    def pool_q_tokens(self, x: torch.Tensor, thw: Sequence[int]):
        """Apply the Q pooling (conv + norm) to x: (B, heads, N, hd). Used by stage transitions."""
        if self.pool_q is None:
            return x, tuple(thw)
        return _pool_tokens(x, self.pool_q, thw, self.norm_q)

    def forward(self, x: torch.Tensor, thw: Sequence[int]):
        """x: (B, N, dim) on grid thw -> ((B, N_q, dim_out), thw_q)."""
        B, N, _ = x.shape
        # (B, N, 3, heads, hd) -> 3 x (B, heads, N, hd)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        thw_q = tuple(thw)
        if self.pool_q is not None:
            q, thw_q = _pool_tokens(q, self.pool_q, thw, self.norm_q)
        if self.pool_k is not None:
            k, _ = _pool_tokens(k, self.pool_k, thw, self.norm_k)
        if self.pool_v is not None:
            v, _ = _pool_tokens(v, self.pool_v, thw, self.norm_v)
        x = nnf.scaled_dot_product_attention(q, k, v)  # (B, heads, N_q, hd)
        x = x.transpose(1, 2).reshape(B, -1, self.dim_out)
        return self.proj_drop(self.proj(x)), thw_q


def window_partition(x: torch.Tensor, hw: Sequence[int], window: int):
    """(B, H*W, C) -> ((B * nW, window*window, C), padded (Hp, Wp)); zero-pads H, W up to
    multiples of `window`."""
    B, _, C = x.shape
    H, W = hw
    x = x.reshape(B, H, W, C)
    pad_h, pad_w = (-H) % window, (-W) % window
    if pad_h or pad_w:
        x = nnf.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.reshape(B, Hp // window, window, Wp // window, window, C).transpose(2, 3)
    return x.reshape(-1, window * window, C), (Hp, Wp)


def window_unpartition(x: torch.Tensor, window: int, padded_hw, hw, batch: int):
    """Inverse of :func:`window_partition`: -> (B, H*W, C)."""
    Hp, Wp = padded_hw
    H, W = hw
    C = x.shape[-1]
    x = x.reshape(batch, Hp // window, Wp // window, window, window, C).transpose(2, 3)
    x = x.reshape(batch, Hp, Wp, C)[:, :H, :W]
    return x.reshape(batch, H * W, C)


class AttentionSubBlock(nn.Module):
    """F of a reversible block: ``attn(norm(x))``, shape preserving.

    Args:
        dim (int): channels.
        num_heads (int): attention heads.
        qkv_bias (bool): bias on qkv.
        kernel_kv, stride_kv: K/V pooling (Rev-MViT); no Q pooling inside reversible blocks.
        proj_drop (float): dropout after the attention projection.
        window_size (int): if > 0, attention within non-overlapping windows of this many tokens
            per side (ViTDet); the grid is zero-padded to a multiple of it. Images only.
    """

    def __init__(self, dim, num_heads, qkv_bias=True, kernel_kv=(1, 1, 1), stride_kv=(1, 1, 1),
                 proj_drop=0.0, norm_eps=1e-6, window_size=0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiScaleAttention(dim, dim, num_heads, qkv_bias=qkv_bias,
                                        kernel_kv=kernel_kv, stride_kv=stride_kv,
                                        proj_drop=proj_drop, norm_eps=norm_eps)
        self.window_size = int(window_size)
        if self.window_size and (self.attn.pool_k is not None or self.attn.pool_v is not None):
            raise ValueError("windowed attention cannot be combined with K/V pooling")

    # (in_scale, skip, out_scale) of a dual-residual rewiring, or None (the ordinary F); set by
    # revvit_d2.vit_import.set_dual_residual, never saved (plain floats, no state-dict entry)
    dual: Optional[Tuple[float, float, float]] = None

    def forward(self, x: torch.Tensor, thw: Sequence[int]) -> torch.Tensor:
        if self.dual is not None:
            return _dual_residual(self._attend, x, self.dual, thw)
        return self._attend(x, thw)

    def _attend(self, x: torch.Tensor, thw: Sequence[int]) -> torch.Tensor:
        x = self.norm(x)
        if self.window_size > 0:
            T, H, W = thw
            if T != 1:
                raise ValueError("windowed attention supports images only (T == 1)")
            w = self.window_size
            windows, padded = window_partition(x, (H, W), w)
            out, _ = self.attn(windows, (1, w, w))
            return window_unpartition(out, w, padded, (H, W), x.shape[0])
        out, _ = self.attn(x, thw)
        return out


class Mlp(nn.Module):
    """fc1 -> GELU -> [dropout] -> fc2 -> [dropout]."""

    def __init__(self, in_features, hidden_features, out_features=None, drop=0.0):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _dual_residual(fn, x: torch.Tensor, dual: Tuple[float, float, float], *args) -> torch.Tensor:
    """``(skip * s_in * x + fn(s_in * x)) * s_out``: a sub-block of a Dr2Net-style rewired
    network written for the ordinary additive coupling (docs/vit_import.md derives the scales).
    Still a function of x alone, so the block stays exactly invertible."""
    s_in, skip, s_out = dual
    x = x * s_in
    out = fn(x, *args)
    if skip:
        out = out + skip * x
    return out * s_out


class MlpSubBlock(nn.Module):
    """G of a reversible block: ``mlp(norm(x))``, shape preserving."""

    dual: Optional[Tuple[float, float, float]] = None  # as AttentionSubBlock.dual

    def __init__(self, dim, mlp_ratio=4.0, drop=0.0, norm_eps=1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x):
        if self.dual is not None:
            return _dual_residual(self._mlp, x, self.dual)
        return self.mlp(self.norm(x))

    def _mlp(self, x):
        return self.mlp(self.norm(x))


class TwoStreamFusion(nn.Module):
    """Merge the two streams stored as one (..., 2C) tensor.

    Modes: ``"concat"`` (identity, width 2C), ``"avg"``, ``"add"``, ``"max"``, ``"min"`` (width C),
    and ``"concat_linear_{m}[_{p}]"`` / ``"ln+concat_linear_{m}[_{p}]"`` (``x + MLP(x)`` with hidden
    width ``m * 2C`` and optional dropout p, width 2C). ``dim`` is the width 2C of the input.

    ``"avg_prenorm"`` (mean of the two streams) and ``"last_prenorm"`` (the second stream) give
    width C and are applied *before* the final LayerNorm, which then has width C
    (:attr:`before_norm`): the final norm and head of a plain ViT apply to them unchanged
    (docs/vit_import.md). ``stream_scales`` (s1, s2), default (1, 1), multiplies the streams
    first (set by a Dr2Net-style rewiring, whose streams are stored scaled).
    """

    PRENORM_MODES = ("avg_prenorm", "last_prenorm")
    stream_scales: Optional[Tuple[float, float]] = None

    def __init__(self, mode: str = "concat", dim: Optional[int] = None):
        super().__init__()
        self.mode = mode
        self.norm = None
        self.fuse_fn = None
        if "concat_linear" in mode:
            if dim is None:
                raise ValueError(f"TwoStreamFusion({mode!r}) needs dim")
            parts = mode.split("concat_linear_")[1].split("_")
            ratio = float(parts[0])
            drop = float(parts[1]) if len(parts) > 1 else 0.0
            if mode.startswith("ln+"):
                self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.fuse_fn = Mlp(dim, int(ratio * dim), dim, drop=drop)
        elif mode not in ("concat", "avg", "add", "max", "min") + self.PRENORM_MODES:
            raise ValueError(f"unknown two-stream fusion mode {mode!r}")

    @property
    def halves_width(self) -> bool:
        """True if the output has the width of one stream (C) rather than both (2C)."""
        return self.mode in ("avg", "add", "max", "min") + self.PRENORM_MODES

    @property
    def before_norm(self) -> bool:
        """True if the fusion is applied before the final norm (which then has width C)."""
        return self.mode in self.PRENORM_MODES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_fn is not None:
            y = self.norm(x) if self.norm is not None else x
            return x + self.fuse_fn(y)
        if self.mode == "concat":
            return x
        a, b = x.chunk(2, dim=-1)
        if self.stream_scales is not None:
            a, b = a * self.stream_scales[0], b * self.stream_scales[1]
        if self.mode == "last_prenorm":
            return b
        if self.mode in ("avg", "avg_prenorm"):
            return (a + b) / 2
        if self.mode == "add":
            return a + b
        if self.mode == "max":
            return torch.maximum(a, b)
        return torch.minimum(a, b)


def resize_pos_embed(pos_embed: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int],
                     mode: Optional[str] = None) -> torch.Tensor:
    """Resize a (1, N, C) position embedding laid out on ``src_grid`` to ``dst_grid``.

    Grids are (H, W) (bicubic, as mmpretrain) or (T, H, W) (trilinear, as SlowFast).
    ``align_corners=False``. Returns the tensor unchanged when the grids are equal.
    """
    src_grid, dst_grid = tuple(src_grid), tuple(dst_grid)
    if src_grid == dst_grid:
        return pos_embed
    if len(src_grid) != len(dst_grid) or math.prod(src_grid) != pos_embed.shape[1]:
        raise ValueError(f"position embedding of shape {tuple(pos_embed.shape)} does not lie on "
                         f"grid {src_grid}")
    C = pos_embed.shape[-1]
    mode = mode or ("bicubic" if len(src_grid) == 2 else "trilinear")
    x = pos_embed.reshape(1, *src_grid, C).movedim(-1, 1)
    x = nnf.interpolate(x.float(), size=dst_grid, mode=mode, align_corners=False)
    return x.movedim(1, -1).reshape(1, -1, C).to(pos_embed.dtype)


def init_official_weights(module: nn.Module):
    """The official initialisation (SlowFast ``MViT._init_weights``), applied per submodule:
    Linear/Conv weights truncated normal std 0.02; Linear biases 0.02; LayerNorm weight 1, bias
    0.02. Conv biases keep PyTorch's default."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.constant_(module.bias, 0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.constant_(module.weight, 1.0)
        nn.init.constant_(module.bias, 0.02)
