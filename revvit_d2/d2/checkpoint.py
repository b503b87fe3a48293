"""A DetectionCheckpointer that understands official Rev-ViT / Rev-MViT checkpoints and saves
atomically.

``RevvitCheckpointer(model, save_dir).load(path)`` with a SlowFast ``.pyth``, an mmpretrain
``.pth`` or a checkpoint written by ``tools/convert_checkpoint.py`` converts it with the explicit
converters (never detectron2's name-matching heuristics), puts it under the prefix of the
reversible backbone inside the detector (e.g. ``backbone.net.`` below a feature pyramid), resizes
the position embedding if needed, and logs exactly which backbone tensors were loaded and which
were not. Detector checkpoints (``model_final.pth``) load as usual. A detectron2 ViT detector
(ViTDet, 'vitdet' format) loads into a Rev-ViT detector whole: its ViT is converted, and its
other tensors (pyramid, RPN, ROI heads) go to the detector under their own names, where
detectron2's checkpointer loads those of the same shape and lists the rest. Into a model without
a reversible backbone (e.g. detectron2's own ViT) such a file loads as it is.

Saves are atomic (:class:`revvit_d2.training.AtomicSaveMixin`): a kill during a save never
leaves a truncated "last" checkpoint (the temporary file of a killed save is removed by the next
save).

Reads never run code from the file (:class:`revvit_d2.training.SafeLoadMixin`): ``.pth`` /
``.pyth`` files load with ``weights_only=True``, and detectron2 / Caffe2 ``.pkl`` files (which
detectron2 unpickles in full) with an unpickler that only rebuilds numpy arrays. A file that
needs more is refused unless the checkpointer was made with ``allow_unsafe_pickle=True``
(``train.allow_unsafe_pickle=True`` in tools/train_net.py).
"""
import logging
from typing import Dict, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from ..checkpoint import (CheckpointMismatchError, adapt_pos_embed, convert_state_dict,
                          detect_format, unwrap_checkpoint)
from ..vit_import import PLAIN_VIT_FORMATS
from ..modeling.rev_mvit import RevMViT
from ..modeling.rev_vit import RevViT
from ..training.checkpoint import AtomicSaveMixin, SafeLoadMixin
from ..utils.io import read_checkpoint

__all__ = ["RevvitCheckpointer", "find_reversible_core"]

logger = logging.getLogger(__name__)

_CLASSIFIER_ONLY = ("head.", "norm.")
_DETECTOR_ONLY = ("out_norms.",)


def _replaced_patch_projection(core: nn.Module) -> Tuple[str, ...]:
    """("patch_embed.proj.",) when the core's patch projection is not the official convolution
    (e.g. a :class:`~revvit_d2.d2.HybridStem`), else ()."""
    proj = getattr(getattr(core, "patch_embed", None), "proj", None)
    if proj is None or isinstance(proj, (nn.Conv2d, nn.Conv3d)):
        return ()
    return ("patch_embed.proj.",)


def find_reversible_core(model: nn.Module) -> Tuple[str, nn.Module]:
    """The (name, module) of the single Rev-ViT / Rev-MViT inside a detector."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, (RevViT, RevMViT))]
    if len(found) != 1:
        raise ValueError(f"expected exactly one reversible backbone in the model, found "
                         f"{[n for n, _ in found]}")
    return found[0]


def _has_reversible_core(model: nn.Module) -> bool:
    return any(isinstance(m, (RevViT, RevMViT)) for m in model.modules())


def _detector_parts(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The tensors of a ViTDet detector outside its ViT (pyramid, RPN, ROI heads), by name: the
    Rev-ViT detector has the same parts, and a ViTDet user fine-tuning reversibly keeps them."""
    parts = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    parts = {k: v for k, v in parts.items() if not k.startswith("backbone.net.")}
    if parts:
        logger.info("%d detector tensors outside the ViT (pyramid, RPN, ROI heads) passed on by "
                    "name (loaded where the detector has the same name and shape)", len(parts))
    return parts


def _is_backbone_only(sd: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("blocks.") for k in sd) and not any(
        k.startswith("backbone.") for k in sd)


def _pkl_checkpoint(data):
    """What detectron2's ``DetectionCheckpointer`` makes of an unpickled ``.pkl`` file (its
    ``_load_file`` unpickles and shapes in one step, so the shaping is repeated here after our
    restricted unpickling): a detectron2 model-zoo file as is, a Caffe2 / Detectron1 file as
    ``{"model": blobs without momenta, "__author__": "Caffe2", "matching_heuristics": True}``."""
    if "model" in data and "__author__" in data:
        logger.info("Reading a file from '%s'", data["__author__"])
        return data
    if "blobs" in data:  # detection models have "blobs", ImageNet models do not
        data = data["blobs"]
    data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}


class RevvitCheckpointer(SafeLoadMixin, AtomicSaveMixin, DetectionCheckpointer):
    """DetectionCheckpointer + official reversible checkpoints + atomic saves + data-only reads
    (``allow_unsafe_pickle=True`` opts in to files that need more; it executes their code)."""

    def _load_file(self, filename: str):
        data = read_checkpoint(filename, allow_unsafe_pickle=self.allow_unsafe_pickle)
        if filename.endswith(".pkl"):
            return _pkl_checkpoint(data)
        fmt = detect_format(data)
        sd = unwrap_checkpoint(data)
        if fmt == "vitdet" and not _has_reversible_core(self.model):
            fmt = "detectron2"  # a plain ViTDet checkpoint into a plain ViT detector: as it is
        if fmt in ("slowfast", "mmpretrain") + PLAIN_VIT_FORMATS or (
                fmt == "revvit" and _is_backbone_only(sd)):
            state = self._backbone_state(data, fmt, filename)
            if fmt == "vitdet":
                state.update(_detector_parts(sd))
            return {"model": state, "__author__": fmt, "matching_heuristics": False}
        if "model" not in data:
            data = {"model": data}
        return data

    def _backbone_state(self, data, fmt: str, filename: str) -> Dict[str, torch.Tensor]:
        prefix, core = find_reversible_core(self.model)
        sd = adapt_pos_embed(convert_state_dict(data, fmt, model=core), core)
        own = core.state_dict()
        loaded = sorted(k for k, v in sd.items() if k in own and own[k].shape == v.shape)
        mismatched = sorted(k for k, v in sd.items() if k in own and own[k].shape != v.shape)
        unused = sorted(k for k in sd if k not in own)
        not_in_ckpt = sorted(k for k in own if k not in sd)
        logger.info("%s (%s format): loaded %d/%d backbone tensors into '%s'", filename, fmt,
                    len(loaded), len(own), prefix)
        if not_in_ckpt:
            logger.info("backbone tensors not in the checkpoint (kept at init): %s",
                        ", ".join(not_in_ckpt))
        if unused:
            logger.info("checkpoint tensors the backbone does not use: %s", ", ".join(unused))
        if mismatched:
            logger.warning("checkpoint tensors with another shape (not loaded): %s",
                           ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                                     for k in mismatched))
        # Only the classifier (head, final norm) may be left over, and only the detector's own
        # per-level norms may be absent: anything else means a checkpoint of another model. A
        # backbone whose patch projection was replaced by a stem (HybridStem) trains that stem
        # from its own init: the official projection is left over and the stem is absent.
        stem = _replaced_patch_projection(core)
        bad_unused = [k for k in unused if not k.startswith(_CLASSIFIER_ONLY + stem)]
        bad_missing = [k for k in not_in_ckpt if not k.startswith(_DETECTOR_ONLY + stem)]
        if bad_unused or bad_missing or mismatched:
            raise CheckpointMismatchError(bad_missing, bad_unused,
                                          [(k, sd[k].shape, own[k].shape) for k in mismatched])
        return {f"{prefix}.{k}": sd[k] for k in loaded}
