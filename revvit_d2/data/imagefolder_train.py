"""ImageNet-style training data: timm's training transform and Mixup / CutMix, checked, over a
:class:`~revvit_d2.data.imagefolder.SafeImageFolder`.

* :func:`build_train_transform`: timm's ``create_transform(is_training=True, ...)`` (random
  resized crop, flip, RandAugment, colour jitter, normalisation, random erasing), the pipeline
  of the official SlowFast ImageNet recipes; the augmentation settings are checked first, so that
  an unknown key or a RandAugment string that timm rejects (or would silently ignore part of)
  is one ``ValueError`` line.
* :func:`build_mixup`: timm's ``Mixup`` (Mixup / CutMix with label smoothing of the mixed soft
  targets), or None when both alphas are 0.
* :class:`SkipUnreadable` + :func:`collate_train_batch`: a sample that cannot be read becomes
  None for the sample stream (which replaces it, see ``revvit_d2.d2.sampler``) and is reported
  with the next good sample of the same worker, so the training process can count it whatever
  the number of loader workers.

Nothing here is random by itself: the samples are made under RNGs seeded from their position in
the training stream (``revvit_d2.training.seeding``, rule 2), and ``Mixup`` draws from the
global RNGs that the trainer reseeds before every step (rule 1).
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from timm.data import Mixup, create_transform
from timm.data.auto_augment import rand_augment_transform

from .imagefolder import SafeImageFolder, SkippedSample

__all__ = [
    "AUGMENT_DEFAULTS",
    "MIXUP_DEFAULTS",
    "build_train_transform",
    "build_mixup",
    "check_rand_augment",
    "SkipUnreadable",
    "collate_train_batch",
]

# The augmentation keys a config may set (``dataloader.train.augment``), with timm's defaults
# for the official recipes' pipeline (``timm.data.transforms_imagenet_train``).
AUGMENT_DEFAULTS: Dict[str, Any] = dict(
    scale=(0.08, 1.0),  # RandomResizedCrop area
    ratio=(3 / 4, 4 / 3),  # RandomResizedCrop aspect
    hflip=0.5,
    color_jitter=0.4,  # used by timm only when auto_augment is None
    auto_augment="rand-m9-mstd0.5-inc1",  # RandAugment (timm syntax); None: off
    interpolation="bicubic",
    re_prob=0.25,  # random erasing probability; 0: off
    re_mode="pixel",
    re_count=1,
)
# ``dataloader.train.mixup`` keys (timm ``Mixup`` arguments); both alphas 0: off.
MIXUP_DEFAULTS: Dict[str, Any] = dict(
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    prob=1.0,
    switch_prob=0.5,
    mode="batch",
    label_smoothing=0.1,
)
_RAND_SECTION = re.compile(r"^(m|n|w|mstd|mmax|inc|p)(\d+(\.\d+)?)$")


def _unknown(given: Mapping[str, Any], known: Mapping[str, Any], what: str):
    bad = sorted(set(given) - set(known))
    if bad:
        raise ValueError(f"unknown {what} key {bad[0]!r} (known: {', '.join(sorted(known))})")


def check_rand_augment(spec: Optional[str]) -> None:
    """A ``ValueError`` line unless `spec` is None or a RandAugment string timm accepts whole
    (``rand-m9-n2-mstd0.5-inc1``): timm asserts on some mistakes and silently skips sections
    without a number (``rand-m9-bogus``), which would train without the intended setting."""
    if spec is None:
        return
    parts = str(spec).split("-")
    if parts[0] != "rand":
        raise ValueError(f"auto_augment {spec!r}: only RandAugment strings ('rand-m9-mstd0.5-"
                         f"inc1', the official recipes' policy) or null are supported")
    for section in parts[1:]:
        if not _RAND_SECTION.match(section):
            raise ValueError(f"auto_augment {spec!r}: timm does not know the RandAugment "
                             f"section {section!r} (m<magnitude>, n<ops>, mstd<std>, "
                             f"mmax<max>, inc<0|1>, w<weights>, p<prob>)")
    try:
        rand_augment_transform(str(spec), {})
    except (AssertionError, ValueError, KeyError) as e:
        raise ValueError(f"auto_augment {spec!r}: timm rejects it: {e}") from None


def build_train_transform(input_size: int, mean: Sequence[float], std: Sequence[float],
                          **augment):
    """timm's training transform of a PIL image (``create_transform(is_training=True)``) with
    the :data:`AUGMENT_DEFAULTS` updated by `augment`; mean and std on the 0-1 scale.

    Raises:
        ValueError: an unknown `augment` key, a RandAugment string timm would not use as
            written, or a value timm rejects.
    """
    _unknown(augment, AUGMENT_DEFAULTS, "augmentation")
    aug = {**AUGMENT_DEFAULTS, **augment}
    check_rand_augment(aug["auto_augment"])
    try:
        return create_transform(int(input_size), is_training=True,
                                scale=tuple(aug["scale"]), ratio=tuple(aug["ratio"]),
                                hflip=float(aug["hflip"]), color_jitter=aug["color_jitter"],
                                auto_augment=aug["auto_augment"],
                                interpolation=str(aug["interpolation"]),
                                mean=tuple(float(m) for m in mean),
                                std=tuple(float(s) for s in std),
                                re_prob=float(aug["re_prob"]), re_mode=str(aug["re_mode"]),
                                re_count=int(aug["re_count"]))
    except (AssertionError, TypeError, ValueError, KeyError) as e:
        raise ValueError(f"training augmentation: {e}") from None


def build_mixup(num_classes: int, **mixup) -> Optional[Mixup]:
    """timm's ``Mixup`` with :data:`MIXUP_DEFAULTS` updated by `mixup`, or None when
    ``mixup_alpha`` and ``cutmix_alpha`` are both 0 (plain labels). Its targets are soft
    (B, num_classes) rows summing to one, for timm's ``SoftTargetCrossEntropy``; mode
    ``batch`` needs an even batch size per process."""
    _unknown(mixup, MIXUP_DEFAULTS, "mixup")
    m = {**MIXUP_DEFAULTS, **mixup}
    if float(m["mixup_alpha"]) <= 0 and float(m["cutmix_alpha"]) <= 0:
        return None
    try:
        return Mixup(mixup_alpha=float(m["mixup_alpha"]), cutmix_alpha=float(m["cutmix_alpha"]),
                     prob=float(m["prob"]), switch_prob=float(m["switch_prob"]),
                     mode=str(m["mode"]), label_smoothing=float(m["label_smoothing"]),
                     num_classes=int(num_classes))
    except (AssertionError, TypeError, ValueError) as e:
        raise ValueError(f"mixup: {e}") from None


class SkipUnreadable:
    """The mapper of the training stream over a :class:`SafeImageFolder` (its items are
    indices): ``index -> (image, label, skipped)``, or None for an unreadable image, which the
    stream replaces. The skipped samples met since the last good one ride along with the next
    good one (``skipped``: list of :class:`SkippedSample`), so they reach the training process
    from any loader worker."""

    def __init__(self, folder: SafeImageFolder):
        self.folder = folder
        self._pending: List[SkippedSample] = []

    def __call__(self, index: int):
        item = self.folder[int(index)]
        if isinstance(item, SkippedSample):
            self._pending.append(item)
            return None
        skipped, self._pending = self._pending, []
        return item[0], int(item[1]), skipped


def collate_train_batch(samples) -> Dict[str, Any]:
    """``{"images": (B, 3, H, W), "targets": (B,), "skipped": [SkippedSample]}`` from
    :class:`SkipUnreadable` outputs."""
    return {"images": torch.stack([s[0] for s in samples]),
            "targets": torch.as_tensor([s[1] for s in samples], dtype=torch.long),
            "skipped": [k for s in samples for k in s[2]]}
