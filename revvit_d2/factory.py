"""``create_model``: a named variant, optionally with a checkpoint loaded strictly.

Joins the variant registry (:func:`revvit_d2.modeling.build_model`, no weights), the strict
loader (:func:`revvit_d2.checkpoint.load_pretrained`) and the rewirings of plain ViT weights
(:mod:`revvit_d2.vit_import`).
"""
from typing import Mapping, Optional

from torch import nn

from .checkpoint import detect_format, load_pretrained
from .modeling.rev_vit import RevViT
from .modeling.variants import build_model, get_pretrained_cfg
from .utils.io import read_checkpoint
from .vit_import import DEFAULT_DR2NET_BETA, PLAIN_VIT_FORMATS, apply_rewiring, rewire_kwargs

__all__ = ["create_model", "plain_vit_to_rev_vit", "check_pretrained_request"]


def check_pretrained_request(name: str, pretrained, checkpoint) -> None:
    """The hub convention ``pretrained=True`` (timm, pytorchvideo, torch.hub) means "download
    the official weights", which is impossible here: it needs ``checkpoint=<local file>``.
    Raises ``TypeError`` for a path given as `pretrained` and ``ValueError`` for ``pretrained``
    without a checkpoint, naming the official file of variant `name`."""
    if isinstance(pretrained, (str, bytes)) or hasattr(pretrained, "__fspath__"):
        raise TypeError(f"{name}: pass the checkpoint path as checkpoint=, not pretrained=")
    if pretrained and checkpoint is None:
        file = get_pretrained_cfg(name).get("checkpoint")
        raise ValueError(
            f"{name}(pretrained=True): weights cannot be downloaded in this environment; pass "
            f"checkpoint=<path to {'the official ' + file if file else 'a checkpoint'}> "
            f"(or pretrained=False for random weights)")


def _read(checkpoint, allow_unsafe_pickle: bool):
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        return read_checkpoint(checkpoint, allow_unsafe_pickle=allow_unsafe_pickle)
    return checkpoint


def create_model(name: str, checkpoint=None, *, rewire: Optional[str] = None,
                 beta: float = DEFAULT_DR2NET_BETA, allow_unsafe_pickle: bool = False,
                 **overrides) -> nn.Module:
    """Build a named variant, and load a checkpoint into it if one is given.

    Args:
        name: one of :func:`revvit_d2.list_models` (``rev_vit_s``, ``rev_vit_b``, ``rev_vit_l``,
            ``rev_mvit_b``, ``rev_mvit_b_16x4``, the tiny ``*_test`` sizes).
        checkpoint: optional path or dict of an official SlowFast / mmpretrain or revvit
            checkpoint, or of a plain ViT (timm / DeiT, MAE, detectron2 ViTDet), loaded strictly
            with :func:`revvit_d2.load_pretrained`.
        rewire: how a plain ViT becomes reversible, ``"re2tal"`` (the default for plain ViT
            checkpoints) or ``"dr2net"`` (docs/vit_import.md); sets the model's ``fuse``.
        beta: the dual-residual coefficient of ``rewire="dr2net"`` (small: close to the plain
            function, poorer reconstruction; see :func:`revvit_d2.vit_import.set_dual_residual`).
        allow_unsafe_pickle: see :func:`revvit_d2.load_pretrained` (executes code from the
            file; only for files you trust).
        **overrides: constructor arguments replacing the variant's (``num_classes``,
            ``drop_path_rate``, ``img_size``, the engine options ``use_rev_backprop``,
            ``rev_anchor_every``...).
    """
    if checkpoint is not None:
        checkpoint = _read(checkpoint, allow_unsafe_pickle)
        if rewire is None and detect_format(checkpoint) in PLAIN_VIT_FORMATS:
            rewire = "re2tal"
    if rewire is not None:
        overrides = {**rewire_kwargs(rewire), **overrides}
    model = build_model(name, **overrides)
    if checkpoint is not None:
        load_pretrained(model, checkpoint)
    if rewire is not None:
        apply_rewiring(model, rewire, beta)
    return model


def plain_vit_to_rev_vit(state_dict: Mapping, model_kwargs: Mapping, rewire: str = "re2tal",
                         beta: float = DEFAULT_DR2NET_BETA) -> RevViT:
    """A :class:`RevViT` built with `model_kwargs` (plus the rewiring's fusion), holding the
    plain ViT weights of `state_dict` (timm / DeiT, MAE or ViTDet, or a checkpoint dict around
    them) loaded strictly, rewired as `rewire` asks ("re2tal" or "dr2net" with `beta`)."""
    model = RevViT(**{**dict(model_kwargs), **rewire_kwargs(rewire)})
    load_pretrained(model, state_dict)
    return apply_rewiring(model, rewire, beta)
