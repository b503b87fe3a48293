"""Clip transforms of the official REV_MVIT_B_16x4 recipe, built from pytorchvideo's transforms.

pytorchvideo datasets yield ``{"video": (C, T, H, W) float 0-255, "label": int, ...}``; both
pipelines act on the ``"video"`` key (``ApplyTransformToKey``) and leave the rest alone:

* training (:func:`build_train_transform`): ``UniformTemporalSubsample(num_frames)`` over the
  randomly placed clip, ``RandomResizedCrop(crop, scale=(0.08, 1.0), aspect_ratio=(0.75, 1.3333))``
  (SlowFast's ``TRAIN_JITTER_SCALES_RELATIVE`` / ``TRAIN_JITTER_ASPECT_RELATIVE``; the same crop
  for every frame, bilinear), horizontal flip with probability 0.5, ``Div255``, ``Normalize``
  (mean 0.45, std 0.225 on the 0-1 scale);
* testing (:func:`build_test_transform`): ``UniformTemporalSubsample(num_frames)``,
  ``ShortSideScale(short_side)``, a ``crop x crop`` crop with pytorchvideo's ``uniform_crop``
  (the centre one, SlowFast's single test crop; or, for 3 crops, the one the view's
  ``aug_index`` names), ``Div255``, ``Normalize``.

The rest of the official training recipe (:mod:`revvit_video.augment`), each piece optional:
RandAugment (``rand_augment="rand-m7-n4-mstd0.5-inc1"``) on the subsampled frames before the
crop, and random erasing (``random_erasing=0.25``) after ``Normalize``, as in SlowFast; with both
off the pipeline is the one above, step for step. Repeated augmentation and Mixup/CutMix act on
the decoded sample and on the batch (:mod:`revvit_video.data`).

``pytorchvideo.transforms`` is imported through :mod:`revvit_video.compat` (torchvision renamed a
private module it imports) when this module is imported. That also covers DataLoader workers
started with ``spawn`` (as under ``torch.multiprocessing.spawn``): unpickling the dataset imports
``revvit_video.data`` and hence this module before any pytorchvideo transform class.
"""
from typing import Callable, Optional, Sequence, Tuple

from torchvision.transforms import Compose, RandomHorizontalFlip

from .augment import ClipRandAugment, ClipRandomErasing
from .compat import import_pytorchvideo_transforms

pvt = import_pytorchvideo_transforms()  # installs the alias first when it is needed
from pytorchvideo.transforms.functional import uniform_crop  # noqa: E402

__all__ = ["build_train_transform", "build_test_transform"]


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> Tuple[Tuple[float, ...], ...]:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if max(mean) > 1.0 or max(std) > 1.0:
        raise ValueError(f"mean {mean} / std {std} must be on the 0-1 scale (the clip is divided "
                         f"by 255 first)")
    return mean, std


def build_train_transform(num_frames: int, crop_size: int,
                          jitter_scales_relative: Sequence[float] = (0.08, 1.0),
                          jitter_aspect_relative: Sequence[float] = (0.75, 1.3333),
                          hflip_prob: float = 0.5,
                          mean: Sequence[float] = (0.45, 0.45, 0.45),
                          std: Sequence[float] = (0.225, 0.225, 0.225),
                          rand_augment: Optional[str] = None,
                          random_erasing: float = 0.0) -> Callable[[dict], dict]:
    """The official training pipeline on a sample dict (see the module docstring).

    Args:
        num_frames: frames taken uniformly from the sampled clip (16 for REV_MVIT_B_16x4).
        crop_size: output side (224).
        jitter_scales_relative: range of the crop area relative to the frame.
        jitter_aspect_relative: range of the crop aspect ratio (log-uniform).
        hflip_prob: probability of a horizontal flip.
        mean, std: per-channel statistics on the 0-1 scale.
        rand_augment: timm-style RandAugment string (``"rand-m7-n4-mstd0.5-inc1"``), or None.
        random_erasing: probability of erasing a box of the normalised clip (0: off).
    """
    mean, std = _check_stats(mean, std)
    steps = [pvt.UniformTemporalSubsample(int(num_frames))]
    if rand_augment:
        steps.append(ClipRandAugment(rand_augment))
    steps += [
        pvt.RandomResizedCrop(int(crop_size), int(crop_size),
                              scale=tuple(float(s) for s in jitter_scales_relative),
                              aspect_ratio=tuple(float(a) for a in jitter_aspect_relative),
                              interpolation="bilinear"),
        RandomHorizontalFlip(float(hflip_prob)),  # flips the last (width) axis of (C, T, H, W)
        pvt.Div255(),
        pvt.Normalize(mean, std),
    ]
    if float(random_erasing) > 0:
        steps.append(ClipRandomErasing(random_erasing))
    return pvt.ApplyTransformToKey("video", Compose(steps))


class _TestViewTransform:
    """Dict-level test transform: the spatial crop of a view is chosen by its ``aug_index``
    (0, 1, 2 = left/top, centre, right/bottom) when there are 3 crops, else the centre."""

    def __init__(self, num_frames, short_side, crop_size, mean, std, num_crops):
        self.subsample = pvt.UniformTemporalSubsample(int(num_frames))
        self.scale = pvt.ShortSideScale(int(short_side))
        self.div255 = pvt.Div255()
        self.normalize = pvt.Normalize(mean, std)
        self.crop_size = int(crop_size)
        self.num_crops = int(num_crops)

    def __call__(self, sample: dict) -> dict:
        x = self.scale(self.subsample(sample["video"]))
        spatial_idx = 1 if self.num_crops == 1 else int(sample.get("aug_index", 1))
        if min(x.shape[-2:]) < self.crop_size:
            raise ValueError(f"cannot crop {self.crop_size} from a {tuple(x.shape[-2:])} clip")
        x = uniform_crop(x, self.crop_size, spatial_idx)
        sample["video"] = self.normalize(self.div255(x))
        return sample


def build_test_transform(num_frames: int, short_side: int, crop_size: int,
                         mean: Sequence[float] = (0.45, 0.45, 0.45),
                         std: Sequence[float] = (0.225, 0.225, 0.225),
                         num_crops: int = 1) -> Callable[[dict], dict]:
    """The official test pipeline on a sample dict (see the module docstring).

    Args:
        num_frames: frames taken uniformly from each test clip.
        short_side: the short side is resized to this (bilinear), keeping the aspect ratio.
        crop_size: side of the square crop (<= short_side).
        mean, std: per-channel statistics on the 0-1 scale.
        num_crops: 1 (centre crop) or 3 (the sample's ``aug_index`` picks left/top, centre,
            right/bottom, as SlowFast's 3-crop test; use ``short_side == crop_size`` then).
    """
    if int(crop_size) > int(short_side):
        raise ValueError(f"test crop {crop_size} is larger than the short side {short_side}")
    if int(num_crops) not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    mean, std = _check_stats(mean, std)
    return _TestViewTransform(num_frames, short_side, crop_size, mean, std, num_crops)
