"""A DetectionCheckpointer that understands official Rev-ViT / Rev-MViT checkpoints and saves
atomically.

``RevvitCheckpointer(model, save_dir).load(path)`` with a SlowFast ``.pyth``, an mmpretrain
``.pth`` or a checkpoint written by ``tools/convert_checkpoint.py`` converts it with the explicit
converters (never detectron2's name-matching heuristics), puts it under the prefix of the
reversible backbone inside the detector (e.g. ``backbone.net.`` below a feature pyramid), resizes
the position embedding if needed, and logs exactly which backbone tensors were loaded and which
were not. Detector checkpoints (``model_final.pth``) load as usual.

``save`` writes to a temporary file in the same directory and renames it over the target, and
``last_checkpoint`` is updated the same way, so a kill during a save never leaves a truncated
"last" checkpoint (the temporary file of a killed save is removed by the next save).
"""
import contextlib
import glob
import logging
import os
import tempfile
from typing import Dict, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from ..checkpoint import CheckpointMismatchError, adapt_pos_embed, convert_state_dict, detect_format, unwrap_checkpoint
from ..modeling.rev_mvit import RevMViT
from ..modeling.rev_vit import RevViT

__all__ = ["AtomicSaveMixin", "RevvitCheckpointer", "find_reversible_core", "atomic_torch_save",
           "check_start_checkpoint", "last_checkpoint_file"]

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


def atomic_torch_save(obj, path: str):
    """torch.save to `path` through a temporary file and an atomic rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def last_checkpoint_file(save_dir: str) -> Optional[str]:
    """The file named by ``<save_dir>/last_checkpoint`` (what ``--resume`` loads), or None when
    there is no such tag. Raises FileNotFoundError when the tag names a missing file."""
    tag = os.path.join(save_dir, "last_checkpoint")
    if not os.path.isfile(tag):
        return None
    with open(tag) as f:
        name = f.read().strip()
    path = os.path.join(save_dir, name)
    if not name or not os.path.isfile(path):
        raise FileNotFoundError(f"{tag} names {name!r}, which is not a file in {save_dir}")
    return path


def check_start_checkpoint(save_dir: str, init_checkpoint, resume: bool) -> None:
    """Raise FileNotFoundError (a one-line message) when the checkpoint a training tool will
    start from does not exist: the one ``last_checkpoint`` names when resuming, else
    ``train.init_checkpoint`` (a URL is left to the loader)."""
    try:
        if resume and last_checkpoint_file(save_dir) is not None:
            return
    except FileNotFoundError as e:
        raise FileNotFoundError(f"cannot resume: {e}") from None
    init = os.path.expanduser(str(init_checkpoint or ""))
    if init and "://" not in init and not os.path.isfile(init):
        raise FileNotFoundError(f"train.init_checkpoint not found: {init_checkpoint}")


def _read(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # older files may pickle config objects next to the weights
        logger.warning("%s holds non-tensor objects; loading it with weights_only=False", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def _is_backbone_only(sd: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("blocks.") for k in sd) and not any(
        k.startswith("backbone.") for k in sd)


class AtomicSaveMixin:
    """For fvcore/detectron2 ``Checkpointer`` subclasses: ``save`` and the ``last_checkpoint``
    tag go through a temporary file, fsync and an atomic rename (fvcore writes both in place,
    so a kill during a save can leave a truncated "last" checkpoint)."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)
        # Temporary files of a save that was killed (SIGKILL runs no cleanup); one process
        # saves into a directory, so any other one is stale.
        for stale in glob.glob(os.path.join(self.save_dir, ".tmp_*")):
            with contextlib.suppress(OSError):
                os.remove(stale)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.save_dir, prefix=".tmp_last_")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(last_filename_basename)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(self.save_dir, "last_checkpoint"))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


class RevvitCheckpointer(AtomicSaveMixin, DetectionCheckpointer):
    """DetectionCheckpointer + official reversible checkpoints + atomic saves."""

    def _load_file(self, filename: str):
        if filename.endswith(".pkl"):
            return super()._load_file(filename)
        data = _read(filename)
        fmt = detect_format(data)
        sd = unwrap_checkpoint(data)
        if fmt in ("slowfast", "mmpretrain") or (fmt == "revvit" and _is_backbone_only(sd)):
            return {"model": self._backbone_state(data, fmt, filename),
                    "__author__": fmt, "matching_heuristics": False}
        if "model" not in data:
            data = {"model": data}
        return data

    def _backbone_state(self, data, fmt: str, filename: str) -> Dict[str, torch.Tensor]:
        prefix, core = find_reversible_core(self.model)
        sd = adapt_pos_embed(convert_state_dict(data, fmt), core)
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
