"""Hub-style entry points (pytorchvideo ``models/hub`` pattern) and official checkpoint loading.

One default-config dict per variant plus one thin function per variant::

    from revvit_video import rev_mvit_b_16x4
    model = rev_mvit_b_16x4(checkpoint="REV_MVIT_B_16x4.pyth")   # official SlowFast file, strict

Weights cannot be downloaded in this environment, so ``pretrained=True`` needs a local file
(``checkpoint=``); without one it raises ``ValueError`` telling you so. Accepted checkpoints: the
official SlowFast ``.pyth`` (``{"model_state": ...}``, keys ``rev_backbone.layers.*``,
``head.projection.*``), a ``revvit_d2`` state dict (``create_model("rev_mvit_b_16x4")`` names),
or a checkpoint of this package (``trunk.*`` / ``head.proj.*``, as written by
tools/run_video.py). Loading is strict: anything missing, unexpected or mis-shaped raises
:class:`revvit_d2.CheckpointMismatchError`. Files are read as data only
(:func:`revvit_d2.utils.io.read_checkpoint`): one whose pickle needs more is refused unless
``allow_unsafe_pickle=True``, which executes code from the file (only for files you trust).
"""
import logging
from typing import Any, Dict, Mapping

import torch
from torch import nn

from revvit_d2 import (
    CheckpointMismatchError,
    convert_state_dict,
    get_pretrained_cfg,
    load_pretrained,
)
from revvit_d2.checkpoint import unwrap_checkpoint
from revvit_d2.factory import check_pretrained_request
from revvit_d2.utils import io

from .models import RevVideoNet, create_rev_mvit, video_builder_kwargs

logger = logging.getLogger(__name__)

__all__ = ["rev_mvit_b_16x4", "rev_mvit_video_test", "load_video_checkpoint", "read_checkpoint",
           "convert_to_video_state_dict"]

def read_checkpoint(path: str, allow_unsafe_pickle: bool = False) -> Mapping[str, Any]:
    """The checkpoint stored in `path`, on the CPU: :func:`revvit_d2.utils.io.read_checkpoint`
    (``weights_only=True``: a SlowFast file holds only tensors, numbers and its YAML string; a
    file that needs more raises :class:`~revvit_d2.utils.io.UnsafeCheckpointError` unless
    `allow_unsafe_pickle`, which executes code from the file)."""
    return io.read_checkpoint(path, allow_unsafe_pickle=allow_unsafe_pickle)


def _is_video_format(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("trunk.", "module.trunk.")) for k in sd)


def convert_to_video_state_dict(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Any accepted checkpoint (see the module docstring) -> :class:`RevVideoNet` names.

    Official / revvit_d2 names map as ``<key>`` -> ``trunk.<key>`` and ``head.{weight,bias}``
    (after ``head.projection.`` -> ``head.``) -> ``head.proj.{weight,bias}``.
    """
    sd = unwrap_checkpoint(checkpoint)
    if _is_video_format(sd):
        return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    out = {}
    for key, value in convert_state_dict(checkpoint).items():
        if key in ("head.weight", "head.bias"):
            out["head.proj." + key.split(".", 1)[1]] = value
        else:
            out["trunk." + key] = value
    return out


def load_video_checkpoint(model: RevVideoNet, checkpoint, load_head: bool = True,
                          allow_unsafe_pickle: bool = False) -> Dict[str, Any]:
    """Load a checkpoint into a :class:`RevVideoNet`, strictly.

    Args:
        model: the model (its trunk a ``RevMViT``).
        checkpoint: a path or an already loaded dict (official ``.pyth``, revvit_d2 or
            revvit_video format).
        load_head: False keeps the model's own head (fine-tuning to other classes); the
            checkpoint's head is then ignored.
        allow_unsafe_pickle: see :func:`read_checkpoint` (executes code from the file; only
            for files you trust).

    Returns:
        the trunk's load report (see :func:`revvit_d2.load_pretrained`) plus ``head``: the head
        keys loaded.
    """
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        checkpoint = read_checkpoint(checkpoint, allow_unsafe_pickle=allow_unsafe_pickle)
    sd = convert_to_video_state_dict(checkpoint)
    trunk_sd = {k[len("trunk."):]: v for k, v in sd.items() if k.startswith("trunk.")}
    head_sd = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    other = sorted(k for k in sd if not k.startswith(("trunk.", "head.")))
    if other:
        raise CheckpointMismatchError([], other)
    # The trunk goes through revvit_d2's strict loader (position-embedding resizing included).
    report = load_pretrained(model.trunk, trunk_sd, fmt="revvit")
    report["head"] = []
    if load_head and model.head is not None:
        own = {k: v for k, v in model.head.state_dict().items()}
        missing = sorted(set(own) - set(head_sd))
        unexpected = sorted(set(head_sd) - set(own))
        mismatched = [(k, v.shape, own[k].shape) for k, v in head_sd.items()
                      if k in own and v.shape != own[k].shape]
        if missing or unexpected or mismatched:
            raise CheckpointMismatchError([f"head.{k}" for k in missing],
                                          [f"head.{k}" for k in unexpected],
                                          [(f"head.{k}", a, b) for k, a, b in mismatched])
        model.head.load_state_dict(head_sd)
        report["head"] = [f"head.{k}" for k in sorted(head_sd)]
    elif load_head and head_sd:
        raise CheckpointMismatchError([], [f"head.{k}" for k in sorted(head_sd)])
    logger.info("loaded %d trunk and %d head tensors", len(report["loaded"]), len(report["head"]))
    return report


def _hub_model(name: str, pretrained: bool, checkpoint, kwargs, allow_unsafe_pickle=False):
    """``create_rev_mvit`` with the dimensions of the revvit_d2 variant `name`, then `kwargs`."""
    check_pretrained_request(name, pretrained, checkpoint)
    cfg = dict(video_builder_kwargs(name), **kwargs)
    model = create_rev_mvit(**cfg)
    pretrained_cfg = get_pretrained_cfg(name)
    pretrained_cfg.update(num_frames=cfg["temporal_size"], num_classes=cfg["head_num_classes"],
                          input_size=(3, cfg["temporal_size"], cfg["spatial_size"],
                                      cfg["spatial_size"]))
    model.pretrained_cfg = pretrained_cfg
    if checkpoint is not None:
        load_video_checkpoint(model, checkpoint, allow_unsafe_pickle=allow_unsafe_pickle)
    return model


def rev_mvit_b_16x4(pretrained: bool = False, checkpoint=None, *,
                    allow_unsafe_pickle: bool = False, **kwargs) -> nn.Module:
    """Rev-MViT-B 16x4 for Kinetics-400 (official REV_MVIT_B_16x4_CONV: 78.4 / 93.4 top-1 / top-5
    with 5 x 1 views; 34.96 M parameters; input (B, 3, 16, 224, 224); logits over 400 classes).

    Args:
        pretrained: True requires `checkpoint` (no download is possible here).
        checkpoint: path or dict of ``REV_MVIT_B_16x4.pyth`` (or a converted / fine-tuned one),
            loaded strictly.
        allow_unsafe_pickle: see :func:`read_checkpoint` (executes code from the file; only
            for files you trust).
        **kwargs: :func:`~revvit_video.models.create_rev_mvit` arguments replacing the
            variant's (e.g. ``head_num_classes``, ``drop_path_rate``, the engine options
            ``use_rev_backprop``, ``rev_anchor_every``...).
    """
    return _hub_model("rev_mvit_b_16x4", pretrained, checkpoint, kwargs, allow_unsafe_pickle)


def rev_mvit_video_test(pretrained: bool = False, checkpoint=None, *,
                        allow_unsafe_pickle: bool = False, **kwargs) -> nn.Module:
    """Tiny Rev-MViT (16 wide, 5 layers, transitions at 1 and 3; input (B, 3, 4, 64, 64), 10
    classes): the structure of the official-code oracle file, used by the tests and the demo.
    Same arguments as :func:`rev_mvit_b_16x4`."""
    return _hub_model("rev_mvit_video_test", pretrained, checkpoint, kwargs, allow_unsafe_pickle)
