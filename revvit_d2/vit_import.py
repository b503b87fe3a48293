"""Plain ViT weights into Rev-ViT: timm / DeiT state dicts, MAE pre-training checkpoints and
detectron2 ViT (ViTDet) backbones, and the rewirings that make them reversible.

A plain pre-norm ViT block computes ``x = x + A(x); x = x + M(x)`` (A = attention with its
norm, M = MLP with its norm). Rev-ViT block i computes ``Y1 = X1 + F(X2); Y2 = X2 + G(Y1)``.
The conversion puts the attention of plain block i into F of reversible block i and its MLP into
G, norms included (``blocks.i.norm1 / attn.qkv / attn.proj -> blocks.i.F.norm / F.attn.qkv /
F.attn.proj``, ``norm2 / mlp.fc1 / mlp.fc2 -> G.norm / G.mlp.fc1 / G.mlp.fc2``); layer-scale
factors (``ls1.gamma``, ``ls2.gamma``) are folded into the projection before them. Rev-ViT has
no class token: ``cls_token`` (and DeiT's ``dist_token``, register tokens) and their position
rows are dropped, and the patch rows of ``pos_embed`` are resized to the model's grid. Every
source tensor is either used or listed as intentionally dropped; every target tensor is either
filled or listed as new by design (:class:`ConversionReport`, logged).

Rewirings (:func:`rewire_kwargs`, :func:`set_dual_residual`; docs/vit_import.md has the
derivation and the measured gaps):

* ``"re2tal"`` (Zhao et al., CVPR 2023): both streams start from the patch tokens and the
  sub-blocks alternate between them unchanged; the model's output is the mean of the two streams
  taken before the final norm (``fuse="avg_prenorm"``), so the plain model's final norm and head
  apply unchanged. A different function until fine-tuned; an ordinary Rev-ViT.
* ``"dr2net"`` (in the spirit of Zhao et al., CVPR 2024): the dual-residual recurrence
  ``z[k+1] = beta * z[k-1] + alpha * z[k] + f_k(z[k])`` over the 2L sub-blocks, which is the
  plain ViT for ``alpha = 1, beta = 0`` and the Re^2TAL network for ``alpha = 0, beta = 1``.
  :func:`apply_rewiring` starts at ``alpha = 1 - beta`` (measured closer than ``alpha = 1``).
  It runs on the ordinary reversible engine: the streams are stored scaled by
  ``sigma[k] = beta ** ceil(k / 2)`` and each sub-block becomes
  ``(alpha * s * x + f(s * x)) / sigma[k + 1]`` with ``s = sigma[k]``, still a function of its
  own input only, so every block stays exactly invertible. Its inverse divides by beta once per
  sub-block: small beta starts close to the plain function but reconstructs the activations
  poorly (measured), which is why Dr2Net moves beta to 1 during fine-tuning.

Library code: torch only (no timm / detectron2 imports); the key names are those of timm's
``VisionTransformer``, MAE's ``models_mae.py`` and detectron2's ``ViT``.
"""
import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .modeling.layers import resize_pos_embed
from .modeling.rev_vit import RevViT

logger = logging.getLogger(__name__)

__all__ = [
    "PLAIN_VIT_FORMATS",
    "REWIRINGS",
    "ConversionReport",
    "PlainViTMismatch",
    "detect_plain_vit",
    "convert_plain_vit",
    "rewire_kwargs",
    "set_dual_residual",
    "apply_rewiring",
]

PLAIN_VIT_FORMATS = ("timm", "mae", "vitdet")
REWIRINGS = ("re2tal", "dr2net")
DEFAULT_DR2NET_BETA = 0.1
REVERSIBLE_BETA = 0.7  # below it the dual-residual inversion loses float32 accuracy (measured)

_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)$")
_BLOCK_MAP = (
    ("norm1.", "F.norm."),
    ("attn.qkv.", "F.attn.qkv."),
    ("attn.proj.", "F.attn.proj."),
    ("norm2.", "G.norm."),
    ("mlp.fc1.", "G.mlp.fc1."),
    ("mlp.fc2.", "G.mlp.fc2."),
)
# layer scale gamma -> the Linear whose output it multiplies
_LAYER_SCALE = {"ls1.gamma": "F.attn.proj.", "ls2.gamma": "G.mlp.fc2."}
_REL_POS = ("attn.rel_pos_h", "attn.rel_pos_w")
_VITDET_QKV = re.compile(r"backbone\.net\.blocks\.\d+\.attn\.qkv\.weight$")
_PLAIN_QKV = re.compile(r"blocks\.\d+\.attn\.qkv\.weight$")

# source key (or prefix) -> why it is not used
_DROPPED = (
    ("cls_token", "Rev-ViT has no class token (its position row is dropped too)"),
    ("dist_token", "DeiT distillation token: not used (its position row is dropped too)"),
    ("reg_token", "register tokens: not used (their position rows are dropped too)"),
    ("head_dist.", "DeiT distillation head: not used"),
    ("mask_token", "MAE mask token: pre-training only"),
    ("decoder_", "MAE decoder: pre-training only"),
)


class PlainViTMismatch(ValueError):
    """A plain ViT checkpoint that does not fit the model (one line naming the first mismatch).
    Raised before anything is loaded."""


@dataclass
class ConversionReport:
    """What a conversion did: ``mapping`` (source -> target key), ``dropped`` and ``new``
    (key -> reason), ``notes`` (function changes worth knowing)."""
    fmt: str
    mapping: List[Tuple[str, str]] = field(default_factory=list)
    dropped: Dict[str, str] = field(default_factory=dict)
    new: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        out = [f"{s} -> {t}" for s, t in self.mapping]
        out += [f"{k} -> (dropped: {why})" for k, why in self.dropped.items()]
        out += [f"(new by design) -> {k}: {why}" for k, why in self.new.items()]
        return out + [f"note: {n}" for n in self.notes]

    def log(self):
        logger.info("plain ViT (%s format): %d tensors mapped, %d dropped, %d new by design",
                    self.fmt, len(self.mapping), len(self.dropped), len(self.new))
        for key, why in self.dropped.items():
            logger.info("  dropped %s: %s", key, why)
        for key, why in self.new.items():
            logger.info("  new by design %s: %s", key, why)
        for note in self.notes:
            logger.info("  note: %s", note)


def detect_plain_vit(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """'timm', 'mae' or 'vitdet' for a plain ViT state dict (already unwrapped), else None."""
    keys = list(sd)
    if any(_VITDET_QKV.match(k) for k in keys):
        return "vitdet"
    if "patch_embed.proj.weight" in sd and any(_PLAIN_QKV.match(k) for k in keys):
        if any(k.startswith(("decoder_", "mask_token")) for k in keys):
            return "mae"
        return "timm"
    return None


def _drop_reason(key: str) -> Optional[str]:
    for prefix, why in _DROPPED:
        if key == prefix or (prefix.endswith((".", "_")) and key.startswith(prefix)):
            return why
    return None


def _patch_rows(pos: torch.Tensor, sd: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, int]:
    """The patch rows of a plain ViT's (1, prefix + H*W, C) position embedding, and how many
    prefix rows (class / distillation / register tokens) were removed."""
    n = pos.shape[1]
    prefix = sum(int(sd[k].shape[1]) for k in ("cls_token", "dist_token", "reg_token")
                 if k in sd and sd[k].ndim == 3)
    for p in dict.fromkeys((prefix, 0, 1)):  # timm; no_embed_class; detectron2 (cls row only)
        if n - p > 0 and math.isqrt(n - p) ** 2 == n - p:
            return pos[:, p:], p
    raise PlainViTMismatch(f"pos_embed has {n} rows: neither a square grid nor a square grid "
                           f"plus {prefix} token rows")


def _model_info(model: nn.Module) -> Dict[str, object]:
    if not isinstance(model, RevViT):
        raise PlainViTMismatch(f"plain ViT weights load into a Rev-ViT only, not a "
                               f"{type(model).__name__}")
    own = model.state_dict()
    return {"own": own, "grid": tuple(model.patch_grid), "depth": len(model.blocks),
            "width": own["patch_embed.proj.weight"].shape[0],
            "patch": tuple(own["patch_embed.proj.weight"].shape[-2:]),
            "in_chans": own["patch_embed.proj.weight"].shape[1]}


def _check_shapes(src: Dict[str, torch.Tensor], info: Dict[str, object], depth: int):
    """First mismatch of architecture between the source and the model, as one line."""
    w = src["patch_embed.proj.weight"]
    checks = (
        ("width (embed_dim)", w.shape[0], info["width"]),
        ("patch size", tuple(w.shape[-2:]), info["patch"]),
        ("input channels", w.shape[1], info["in_chans"]),
        ("depth", depth, info["depth"]),
    )
    for what, theirs, ours in checks:
        if theirs != ours:
            raise PlainViTMismatch(f"plain ViT checkpoint {what} {theirs} does not match the "
                                   f"model's {ours}")
    own = info["own"]
    for key in ("blocks.0.G.mlp.fc1.weight", "blocks.0.F.attn.qkv.weight"):
        if key in src and src[key].shape != own[key].shape:
            raise PlainViTMismatch(f"plain ViT checkpoint {key} has shape "
                                   f"{tuple(src[key].shape)}, the model {tuple(own[key].shape)}")


def convert_plain_vit(sd: Mapping[str, torch.Tensor], fmt: str = "auto",
                      model: Optional[nn.Module] = None
                      ) -> Tuple["OrderedDict[str, torch.Tensor]", ConversionReport]:
    """Convert a plain ViT state dict (unwrapped: the dict of tensors) to Rev-ViT names.

    Args:
        sd: timm / DeiT, MAE or detectron2 ViT(Det) tensors (``backbone.net.`` keys for the
            latter; the detector's other parts are dropped and listed).
        fmt: 'timm', 'mae', 'vitdet' or 'auto'.
        model: the target Rev-ViT. With it, the architecture is checked first (width, patch size,
            input channels, depth, MLP width: one-line :class:`PlainViTMismatch` naming the first
            difference), ``pos_embed`` is resized to its grid, norm and head are shaped for its
            fusion, and the tensors new by design are filled (a missing final norm: identity
            affine; a missing head: the model's own initialisation).

    Returns:
        (state dict in revvit names, :class:`ConversionReport`). Nothing is written anywhere.
    """
    detected = detect_plain_vit(sd)
    fmt = detected if fmt == "auto" else fmt
    if fmt not in PLAIN_VIT_FORMATS or detected is None:
        raise PlainViTMismatch(f"not a plain ViT state dict (format {fmt!r}): no "
                               f"blocks.N.attn.qkv.weight / patch_embed.proj.weight keys")
    report = ConversionReport(fmt)
    src: Dict[str, torch.Tensor] = OrderedDict()
    for key, value in sd.items():
        if fmt == "vitdet":
            if not key.startswith("backbone.net."):
                report.dropped[key] = ("detector part outside the ViT (pyramid, heads): not "
                                          "converted; RevvitCheckpointer passes it on by name")
                continue
            key = key[len("backbone.net."):]
        src[key] = value
    if "patch_embed.proj.weight" not in src:
        raise PlainViTMismatch("plain ViT checkpoint has no patch_embed.proj.weight")

    rel = [k for k in src if k.endswith(_REL_POS)]
    if rel:
        raise PlainViTMismatch(
            f"relative position parameters are not supported (Rev-ViT uses absolute positions "
            f"only): {', '.join(rel[:4])}{' ...' if len(rel) > 4 else ''}; convert a ViT built "
            f"with use_rel_pos=False")

    out: Dict[str, torch.Tensor] = OrderedDict()
    scales: Dict[str, Tuple[str, torch.Tensor]] = {}
    block_ids = set()
    for key, value in src.items():
        why = _drop_reason(key)
        if why is not None:
            report.dropped[key] = why
            continue
        m = _BLOCK.match(key)
        if m:
            idx, rest = m.group(1), m.group(2)
            block_ids.add(int(idx))
            if rest in _LAYER_SCALE:
                scales[f"blocks.{idx}.{_LAYER_SCALE[rest]}"] = (key, value)
                continue
            for old, new in _BLOCK_MAP:
                if rest.startswith(old) and rest[len(old):] in ("weight", "bias"):
                    out[f"blocks.{idx}.{new}{rest[len(old):]}"] = value
                    report.mapping.append((key, f"blocks.{idx}.{new}{rest[len(old):]}"))
                    break
            else:
                raise PlainViTMismatch(f"unknown key in the plain ViT checkpoint: {key}")
        elif key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed",
                     "norm.weight", "norm.bias", "head.weight", "head.bias"):
            out[key] = value
            report.mapping.append((key, key))
        elif key in ("fc_norm.weight", "fc_norm.bias"):
            out["norm." + key.split(".")[1]] = value
            report.mapping.append((key, "norm." + key.split(".")[1]))
            if key.endswith("weight"):
                report.notes.append("fc_norm (applied after pooling in the source) becomes the "
                                    "final norm, applied per token before pooling")
        else:
            raise PlainViTMismatch(f"unknown key in the plain ViT checkpoint: {key}")

    depth = max(block_ids) + 1 if block_ids else 0
    if sorted(block_ids) != list(range(depth)) or depth == 0:
        raise PlainViTMismatch(f"plain ViT checkpoint blocks are not numbered 0..N-1: "
                               f"{sorted(block_ids)[:8]}")
    for target, (key, gamma) in scales.items():  # y = gamma * (W x + b)
        out[target + "weight"] = out[target + "weight"] * gamma[:, None]
        out[target + "bias"] = out[target + "bias"] * gamma
        report.mapping.append((key, f"{target}weight/bias (folded)"))

    if "pos_embed" in out:
        out["pos_embed"], prefix = _patch_rows(out["pos_embed"], src)
        if prefix:
            report.notes.append(f"pos_embed: {prefix} token row(s) dropped")
    if model is not None:
        _fit_to_model(out, report, _model_info(model), depth)
    report.log()
    return OrderedDict(out), report


def _fit_to_model(out: Dict[str, torch.Tensor], report: ConversionReport, info, depth: int):
    """Resize, reshape and fill the converted tensors for the target model (in place)."""
    _check_shapes(out, info, depth)
    own, width = info["own"], info["width"]
    if "pos_embed" in out and "pos_embed" in own:
        n = out["pos_embed"].shape[1]
        src_grid = (math.isqrt(n),) * 2
        if src_grid != info["grid"]:
            report.notes.append(f"pos_embed resized from grid {src_grid} to {info['grid']} "
                                f"(bicubic)")
            out["pos_embed"] = resize_pos_embed(out["pos_embed"], src_grid, info["grid"],
                                                mode="bicubic")
    elif "pos_embed" in own:
        out["pos_embed"] = torch.zeros_like(own["pos_embed"])
        report.new["pos_embed"] = "the source has no absolute position embedding: zeros"
    for i in range(depth):
        key = f"blocks.{i}.F.attn.qkv.bias"
        if key in own and key not in out:
            out[key] = torch.zeros_like(own[key])
            report.new[key] = "the source has no qkv bias: zeros (same function)"
    norm_width = own["norm.weight"].shape[0] if "norm.weight" in own else None
    if norm_width is not None:
        if "norm.weight" not in out:
            out["norm.weight"] = torch.ones(width)
            out["norm.bias"] = torch.zeros(width)
            report.new["norm.weight"] = report.new["norm.bias"] = (
                "the source has no final norm: identity affine")
        if norm_width == 2 * width:  # fusion after the norm: both streams get the same affine
            out["norm.weight"] = torch.cat([out["norm.weight"]] * 2)
            out["norm.bias"] = torch.cat([out["norm.bias"]] * 2)
            report.notes.append("final norm duplicated over the two streams (the model "
                                "normalises their 2C concatenation)")
    else:
        for key in ("norm.weight", "norm.bias"):
            if out.pop(key, None) is not None:
                report.dropped[key] = "the model has no final norm"
    if "head.weight" in own:
        if "head.weight" not in out:
            out["head.weight"], out["head.bias"] = own["head.weight"], own["head.bias"]
            report.new["head.weight"] = report.new["head.bias"] = (
                "the source has no classifier: the model's initialisation")
        elif own["head.weight"].shape[1] == 2 * width:  # concat fusion: mean of the streams
            out["head.weight"] = torch.cat([out["head.weight"]] * 2, dim=1) / 2
            report.notes.append("head applied to the mean of the two streams (weights halved "
                                "over the 2C concatenation)")
    else:
        for key in ("head.weight", "head.bias"):
            if out.pop(key, None) is not None:
                report.dropped[key] = "the model has no classifier"


def rewire_kwargs(rewire: str) -> Dict[str, str]:
    """The Rev-ViT constructor arguments a rewiring needs (its output fusion)."""
    if rewire == "re2tal":
        return {"fuse": "avg_prenorm"}
    if rewire == "dr2net":
        return {"fuse": "last_prenorm"}
    raise ValueError(f"unknown rewire {rewire!r}; choose one of {', '.join(REWIRINGS)}")


def set_dual_residual(model: nn.Module, alpha: float, beta: float) -> nn.Module:
    """Make `model` (a Rev-ViT) compute ``z[k+1] = beta * z[k-1] + alpha * z[k] + f_k(z[k])``
    over its 2L sub-blocks (F and G of each block in order), with ``z[-1] = z[0]`` = the patch
    tokens. ``alpha = 0, beta = 1`` restores the ordinary Rev-ViT (bit-identical); ``alpha = 1``
    and small ``beta`` approach the plain ViT the weights came from. Call again with new values
    to follow a fine-tuning schedule; the coefficients are plain floats (not in the state dict).
    """
    if not 0 < beta <= 1:
        raise ValueError(f"beta must lie in (0, 1] (0 is the plain, non-invertible network); "
                         f"got {beta}")
    subs = []
    for block in model.reversible_blocks():
        subs += [block.F, block.G]
    if alpha == 0 and beta == 1:
        for sub in subs:
            sub.dual = None
        model.fuse.stream_scales = None
        model.dual_residual = None
        return model

    def sigma(k: int) -> float:  # stream k is stored divided by beta ** ceil(k / 2)
        return 1.0 if k < 0 else float(beta) ** ((k + 1) // 2)

    for k, sub in enumerate(subs):
        sub.dual = (sigma(k), float(alpha), 1.0 / sigma(k + 1))
    model.fuse.stream_scales = (sigma(len(subs) - 1), sigma(len(subs)))
    model.dual_residual = (float(alpha), float(beta))
    return model


def apply_rewiring(model: nn.Module, rewire: str, beta: float = DEFAULT_DR2NET_BETA) -> nn.Module:
    """Set `model`'s coefficients for `rewire`: 're2tal' (alpha 0, beta 1: the ordinary
    Rev-ViT) or 'dr2net' (alpha = 1 - beta with the given beta: close to the plain function for
    small beta; the linear part ``beta * z[k-1] + (1 - beta) * z[k]`` keeps a constant stream
    constant, so the gap grows with beta times the residual branches, not the streams)."""
    expected = rewire_kwargs(rewire)["fuse"]
    if model.fuse.mode != expected:
        raise ValueError(f"rewire={rewire!r} needs a model built with fuse={expected!r} "
                         f"(got {model.fuse.mode!r})")
    if rewire == "re2tal":
        return set_dual_residual(model, 0.0, 1.0)
    if beta < REVERSIBLE_BETA and model.use_rev_backprop:
        # measured (docs/results/vit_conversion_gap_cpu.md): at depth 12 the inversion loses
        # float32 accuracy below beta ~0.7; the gradients of a reversible backward are then wrong
        logger.warning("rewire='dr2net' with beta=%g: the reversible backward is inaccurate "
                       "below beta ~%g (docs/vit_import.md); train with "
                       "use_rev_backprop=False until beta has grown", beta, REVERSIBLE_BETA)
    return set_dual_residual(model, 1.0 - beta, beta)
