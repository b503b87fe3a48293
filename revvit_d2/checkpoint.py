"""Conversion of official checkpoints into revvit's parameter names, and strict loading.

Outside formats understood:

* SlowFast ``.pyth`` (``{"model_state": sd, ...}``) with keys such as
  ``rev_backbone.layers.3.F.attn.q.weight`` and ``head.projection.weight``;
* mmpretrain ``.pth`` (``{"state_dict": sd, "meta": ...}``) with ``backbone.`` / ``head.``
  prefixes, a fused ``attn.qkv`` and possibly a 197-row ``pos_embed`` plus a stray ``cls_token``
  (the Dec-2022 release format);
* plain ViTs: timm / DeiT state dicts, MAE pre-training checkpoints and detectron2 ViT(Det)
  backbones ('timm', 'mae', 'vitdet'), converted by :mod:`revvit_d2.vit_import` (which also
  holds the rewirings that make them reversible).

The converters are pure key/tensor maps (timm's ``checkpoint_filter_fn`` pattern): they apply to
a dict of gradients exactly as to a dict of weights. Loading (:func:`load_pretrained`) is strict:
anything missing or unexpected raises :class:`CheckpointMismatchError` listing the keys.
"""
import logging
import math
import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .modeling.layers import resize_pos_embed
from .utils.io import read_checkpoint
from .vit_import import PLAIN_VIT_FORMATS, convert_plain_vit, detect_plain_vit

logger = logging.getLogger(__name__)

__all__ = [
    "convert_slowfast_state_dict",
    "convert_mmpretrain_state_dict",
    "convert_state_dict",
    "detect_format",
    "describe_mapping",
    "unwrap_checkpoint",
    "load_pretrained",
    "CheckpointMismatchError",
]


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the model: lists missing, unexpected and mis-shaped keys."""

    def __init__(self, missing, unexpected, mismatched=()):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = list(mismatched)
        parts = []
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {_short(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {_short(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]
            parts.append(f"shape mismatches ({len(shown)}): {_short(shown)}")
        super().__init__("checkpoint does not match the model: " + "; ".join(parts))


def _short(items: List[str], limit: int = 12) -> str:
    s = ", ".join(items[:limit])
    return s + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def unwrap_checkpoint(ckpt: Mapping) -> Mapping[str, torch.Tensor]:
    """Return the state dict inside a SlowFast / mmengine / detectron2 / revvit checkpoint."""
    for key in ("model_state", "state_dict", "model"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            return ckpt[key]
    return ckpt


def _strip_module(sd: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    out = OrderedDict()
    for k, v in sd.items():
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


_QKV = re.compile(r"(.*\.attn\.)([qkv])\.(weight|bias)$")


def _slowfast_key(key: str) -> str:
    if key.startswith("rev_backbone.layers."):
        return "blocks." + key[len("rev_backbone.layers."):]
    if key.startswith("head.projection."):
        return "head." + key[len("head.projection."):]
    return key


def convert_slowfast_state_dict(sd: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Map an official SlowFast Rev-ViT / Rev-MViT state dict (or a dict of its gradients) to
    revvit names.

    ``rev_backbone.layers.{i}.`` -> ``blocks.{i}.``; ``F.attn.{q,k,v}.{weight,bias}`` are
    concatenated (q, k, v order) into ``F.attn.qkv.{weight,bias}``; ``head.projection.`` ->
    ``head.``; a DDP ``module.`` prefix is dropped; everything else keeps its name.
    """
    sd = _strip_module(unwrap_checkpoint(sd))
    out = OrderedDict()
    pending: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        new = _slowfast_key(key)
        m = _QKV.match(new)
        if m:
            pending.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            out[new] = value
    for (prefix, suffix), parts in pending.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{prefix}: found {sorted(parts)} of the separate q/k/v "
                           f"{suffix}s; all three are needed to build {prefix}qkv.{suffix}")
        out[prefix + "qkv." + suffix] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


_MMPRETRAIN_LAYER_RENAMES = (
    ("ln1.", "F.norm."),
    ("attn.", "F.attn."),
    ("ln2.", "G.norm."),
    ("ffn.layers.0.0.", "G.mlp.fc1."),
    ("ffn.layers.1.", "G.mlp.fc2."),
)


def _drop_extra_pos_row(pos: torch.Tensor) -> torch.Tensor:
    n = pos.shape[1]
    if math.isqrt(n) ** 2 != n and math.isqrt(n - 1) ** 2 == n - 1:
        logger.info("pos_embed has %d rows (class-token row + %d patches): dropping row 0", n, n - 1)
        return pos[:, 1:]
    return pos


def _mmpretrain_key(key: str) -> Optional[str]:
    if key == "backbone.cls_token":
        return None
    if key.startswith("backbone.layers."):
        idx, rest = key[len("backbone.layers."):].split(".", 1)
        for old, repl in _MMPRETRAIN_LAYER_RENAMES:
            if rest.startswith(old):
                rest = repl + rest[len(old):]
                break
        return f"blocks.{idx}.{rest}"
    for old, repl in (("backbone.ln1.", "norm."),
                      ("backbone.patch_embed.projection.", "patch_embed.proj."),
                      ("backbone.", ""),
                      ("head.fc.", "head.")):
        if key.startswith(old):
            return repl + key[len(old):]
    return key


def convert_mmpretrain_state_dict(sd: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Map an mmpretrain ``RevVisionTransformer`` classifier state dict (or its gradients) to
    revvit names.

    ``backbone.layers.{i}.{ln1, attn, ln2, ffn.layers.0.0, ffn.layers.1}`` ->
    ``blocks.{i}.{F.norm, F.attn, G.norm, G.mlp.fc1, G.mlp.fc2}``; ``backbone.ln1`` (the final
    2C norm) -> ``norm``; ``backbone.patch_embed.projection`` -> ``patch_embed.proj``;
    ``head.fc`` -> ``head``. A 197-row ``pos_embed`` (N + 1 rows, N a square) loses its first row,
    which the 2022 code only added to a discarded class token, and ``backbone.cls_token`` is
    dropped; both are logged.
    """
    sd = _strip_module(unwrap_checkpoint(sd))
    out = OrderedDict()
    for key, value in sd.items():
        new = _mmpretrain_key(key)
        if new is None:
            logger.info("dropping %s (RevViT has no class token)", key)
            continue
        if new == "pos_embed":
            value = _drop_extra_pos_row(value)
        out[new] = value
    return out


def describe_mapping(sd_or_ckpt: Mapping, fmt: str = "auto") -> List[str]:
    """Human-readable ``source -> target`` lines of a conversion (q/k/v groups on one line)."""
    fmt = detect_format(sd_or_ckpt) if fmt == "auto" else fmt
    sd = _strip_module(unwrap_checkpoint(sd_or_ckpt))
    lines, grouped = [], set()
    for key in sd:
        if fmt == "slowfast":
            new = _slowfast_key(key)
            m = _QKV.match(new)
            if m:
                group = (m.group(1), m.group(3))
                if group not in grouped:
                    grouped.add(group)
                    src = key[: -len(f"{m.group(2)}.{m.group(3)}")]
                    lines.append(f"{src}{{q,k,v}}.{m.group(3)} -> {m.group(1)}qkv.{m.group(3)}")
                continue
        elif fmt == "mmpretrain":
            new = _mmpretrain_key(key) or "(dropped)"
        elif fmt in PLAIN_VIT_FORMATS:
            return convert_plain_vit(sd, fmt)[1].lines()
        else:
            new = key
        lines.append(f"{key} -> {new}")
    return lines


def detect_format(sd_or_ckpt: Mapping) -> str:
    """'slowfast', 'mmpretrain', 'timm', 'mae', 'vitdet' or 'revvit', from the wrapper key or
    the key names."""
    if "model_state" in sd_or_ckpt:
        return "slowfast"
    sd = unwrap_checkpoint(sd_or_ckpt)
    keys = [k[len("module."):] if k.startswith("module.") else k for k in sd]
    if any(k.startswith("rev_backbone.") for k in keys):
        return "slowfast"
    if any(k.startswith("backbone.layers.") or k.startswith("backbone.patch_embed.projection")
           for k in keys):
        return "mmpretrain"
    return detect_plain_vit(_strip_module(sd)) or "revvit"


def convert_state_dict(sd_or_ckpt: Mapping, fmt: str = "auto",
                       model: Optional[nn.Module] = None) -> "OrderedDict[str, torch.Tensor]":
    """Convert any supported checkpoint (or bare state dict) to revvit names. `model` (the
    target) is used by the plain-ViT converters: architecture check first, position embedding
    resized, tensors new by design filled (:func:`revvit_d2.vit_import.convert_plain_vit`)."""
    fmt = detect_format(sd_or_ckpt) if fmt == "auto" else fmt
    if fmt in PLAIN_VIT_FORMATS:
        return convert_plain_vit(_strip_module(unwrap_checkpoint(sd_or_ckpt)), fmt, model)[0]
    if fmt == "slowfast":
        return convert_slowfast_state_dict(sd_or_ckpt)
    if fmt == "mmpretrain":
        return convert_mmpretrain_state_dict(sd_or_ckpt)
    if fmt == "revvit":
        return _strip_module(unwrap_checkpoint(sd_or_ckpt))
    raise ValueError(f"unknown checkpoint format {fmt!r} (slowfast, mmpretrain, timm, mae, "
                     f"vitdet, revvit or auto)")


def _pos_grid(model: nn.Module, name: str) -> Optional[Tuple[int, ...]]:
    grids = getattr(model, "pos_embed_grids", None)
    if grids is not None:
        return grids.get(name)
    if name == "pos_embed" and hasattr(model, "patch_grid"):
        return tuple(model.patch_grid)
    return None


def _square_grid(n: int) -> Optional[Tuple[int, int]]:
    s = math.isqrt(n)
    return (s, s) if s * s == n else None


def adapt_pos_embed(sd: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Resize a checkpoint's joint 2-D ``pos_embed`` to the model's grid when they differ.

    The checkpoint grid is taken to be square (as every official image checkpoint is); the
    interpolation is bicubic with ``align_corners=False``. Logged when it happens.
    """
    if "pos_embed" not in sd:
        return sd
    target = _pos_grid(model, "pos_embed")
    own = model.state_dict().get("pos_embed")
    if target is None or own is None or sd["pos_embed"].shape == own.shape:
        return sd
    if len(target) != 2:
        return sd
    src = _square_grid(sd["pos_embed"].shape[1])
    if src is None or sd["pos_embed"].shape[-1] != own.shape[-1]:
        return sd  # reported as a shape mismatch by load_pretrained
    logger.info("resizing pos_embed from grid %s to %s (bicubic)", src, tuple(target))
    sd = dict(sd)
    sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], src, target, mode="bicubic")
    return sd


def load_pretrained(model: nn.Module, checkpoint, fmt: str = "auto",
                    ignore_prefixes: Iterable[str] = (), strict: bool = True,
                    allow_unsafe_pickle: bool = False):
    """Load an official or revvit checkpoint into `model`, strictly.

    Args:
        model: a revvit model.
        checkpoint: a path (``.pyth`` / ``.pth`` / ``.pt``) or an already loaded dict.
        fmt: 'auto', 'slowfast', 'mmpretrain', 'timm', 'mae', 'vitdet' or 'revvit'. A plain
            ViT (timm / MAE / ViTDet) into a model of another architecture or size raises
            :class:`revvit_d2.vit_import.PlainViTMismatch` (one line) before loading anything.
        ignore_prefixes: model/checkpoint keys under these prefixes are neither required nor
            loaded (e.g. ``("head.",)`` to fine-tune with a new classifier).
        strict: raise :class:`CheckpointMismatchError` on any missing, unexpected or
            mis-shaped key (after `ignore_prefixes`). With False, the report is returned.
        allow_unsafe_pickle: a path is read with :func:`revvit_d2.utils.io.read_checkpoint`,
            which refuses a file that needs more than data to unpickle
            (:class:`~revvit_d2.utils.io.UnsafeCheckpointError`); True loads such a file after
            a warning. This executes code from the file: only for files you trust.

    Returns:
        dict with ``loaded``, ``missing``, ``unexpected`` and ``ignored`` key lists.
    """
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        checkpoint = read_checkpoint(checkpoint, allow_unsafe_pickle=allow_unsafe_pickle)
    sd = adapt_pos_embed(convert_state_dict(checkpoint, fmt, model=model), model)
    ignore = tuple(ignore_prefixes)
    own = model.state_dict()
    ignored = sorted({k for k in list(sd) + list(own) if ignore and k.startswith(ignore)})
    sd = {k: v for k, v in sd.items() if not (ignore and k.startswith(ignore))}
    expected = {k for k in own if not (ignore and k.startswith(ignore))}
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    mismatched = [(k, v.shape, own[k].shape) for k, v in sd.items()
                  if k in own and v.shape != own[k].shape]
    if strict and (missing or unexpected or mismatched):
        raise CheckpointMismatchError(missing, unexpected, mismatched)
    loadable = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    report = {"loaded": sorted(loadable), "missing": missing, "unexpected": unexpected,
              "mismatched": [k for k, _, _ in mismatched], "ignored": ignored}
    logger.info("loaded %d tensors; missing %d, unexpected %d, ignored %d", len(loadable),
                len(missing), len(unexpected), len(ignored))
    return report
