"""The augmentations of the official Kinetics training recipe (SlowFast's ``AUG`` and ``MIXUP``
sections of REV_MVIT_B_16x4_CONV) on top of :mod:`revvit_video.transforms`' base pipeline,
built from pytorchvideo's and timm's implementations.

* :class:`ClipRandAugment`: ``rand-m7-n4-mstd0.5-inc1`` (timm's notation, parsed by
  :func:`parse_rand_augment`) with pytorchvideo's video ``RandAugment``: the same ops and
  magnitudes on every frame of the clip, applied to the whole decoded frames before the crop, as
  SlowFast does. pytorchvideo's op table is the increasing-severity one (``inc1``: stronger
  enhancement / posterize / solarize with larger magnitude), the magnitude of each op is drawn
  from a normal distribution (mean m, std ``mstd``) clipped to [0, 10], each op is applied with
  probability 0.5. What differs from SlowFast's copy of timm's RandAugment: 14 ops (no
  ``SolarizeAdd``), the ``n`` ops of a clip are drawn without replacement, geometric ops
  interpolate bilinearly (SlowFast: bicubic) on float pixels (SlowFast: 8-bit PIL images).
* :class:`ClipRandomErasing`: timm's ``RandomErasing`` (``mode="pixel"``, one box) on the
  normalised clip, seen as one ``(C*T, H, W)`` image: one box for the whole clip, fresh normal
  noise in every frame, as SlowFast's ``cube`` erasing.
* :class:`RepeatedAugmentation`: the transform applied ``num_sample`` times to one decoded clip
  (SlowFast's ``AUG.NUM_SAMPLE``); the loader puts the samples of a video next to each other in
  the batch.
* :class:`ClipMixer` (:func:`build_clip_mixer`): pytorchvideo's ``MixUp`` / ``CutMix`` on a
  batch, with SlowFast's (timm's) keys ``mixup_alpha``, ``cutmix_alpha``, ``prob``,
  ``switch_prob``, ``label_smoothing``: soft targets ``(B, K)`` that sum to one.
"""
import math
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from timm.data.random_erasing import RandomErasing

from .compat import import_pytorchvideo_transforms

pvt = import_pytorchvideo_transforms()  # installs the alias first when it is needed
from pytorchvideo.transforms.functional import convert_to_one_hot  # noqa: E402

__all__ = [
    "MIXUP_KEYS",
    "ClipMixer",
    "ClipRandAugment",
    "ClipRandomErasing",
    "RepeatedAugmentation",
    "build_clip_mixer",
    "check_train_augmentation",
    "flatten_repeated",
    "mixup_args",
    "parse_rand_augment",
]

# SlowFast's MIXUP keys (timm's Mixup arguments) with the official values.
MIXUP_KEYS = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5,
              "label_smoothing": 0.1}

_RAND_PART = re.compile(r"^(m|n|mstd|inc)(\d+(?:\.\d+)?)$")


def _is_off(value: Any) -> bool:
    """None, or the text a command-line override gives for it (``key=None`` is the string
    ``"None"`` in detectron2's override grammar; ``key=null`` is None)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in
                             ("", "none", "null"))


def parse_rand_augment(spec: Optional[str]) -> Optional[Dict[str, Any]]:
    """``"rand-m7-n4-mstd0.5-inc1"`` -> ``{"magnitude": 7, "num_layers": 4, "sampling_std":
    0.5}`` (None or ``""``: None). Defaults as in timm: m 10, n 2, mstd 0. Raises ValueError for
    anything else (other keys, ``inc0``: pytorchvideo has the increasing-severity ops only)."""
    if _is_off(spec):
        return None
    parts = str(spec).strip().split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment {spec!r}: expected 'rand-m<magnitude>-n<ops>-mstd<std>-"
                         f"inc1', e.g. 'rand-m7-n4-mstd0.5-inc1'")
    out = {"magnitude": 10.0, "num_layers": 2, "sampling_std": 0.0}
    for part in parts[1:]:
        match = _RAND_PART.match(part)
        if match is None:
            raise ValueError(f"RandAugment {spec!r}: unknown part {part!r} (known: m<magnitude>, "
                             f"n<ops>, mstd<std>, inc1)")
        key, value = match.group(1), float(match.group(2))
        if key == "inc" and value != 1:
            raise ValueError(f"RandAugment {spec!r}: only inc1 (pytorchvideo's ops are the "
                             f"increasing-severity ones)")
        if key == "m" and not 0 <= value <= 10:
            raise ValueError(f"RandAugment {spec!r}: magnitude must be in [0, 10]")
        if key == "n" and not (value.is_integer() and 1 <= value <= 14):
            raise ValueError(f"RandAugment {spec!r}: n must be an integer in [1, 14]")
        if key == "m":
            out["magnitude"] = value
        elif key == "n":
            out["num_layers"] = int(value)
        elif key == "mstd":
            out["sampling_std"] = value
    return out


class ClipRandAugment:
    """pytorchvideo's ``RandAugment`` on a ``(C, T, H, W)`` clip of 0-255 floats (the decoder's
    scale, kept for the rest of the pipeline): the ops see ``(T, C, H, W)`` on the 0-1 scale
    they expect (fill 0.5, clamping at 1)."""

    def __init__(self, spec: str):
        params = parse_rand_augment(spec)
        if params is None:
            raise ValueError("ClipRandAugment needs a RandAugment string")
        self.spec = str(spec)
        self.augment = pvt.RandAugment(magnitude=params["magnitude"],
                                       num_layers=params["num_layers"], prob=0.5,
                                       sampling_type="gaussian",
                                       sampling_hparas={"sampling_std": params["sampling_std"]})

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        frames = (clip / 255.0).permute(1, 0, 2, 3)  # (T, C, H, W), 0-1
        return self.augment(frames).permute(1, 0, 2, 3).mul(255.0)

    def __repr__(self):
        return f"ClipRandAugment({self.spec!r})"


class ClipRandomErasing:
    """timm's ``RandomErasing`` (per-pixel normal noise, one box) on a normalised ``(C, T, H,
    W)`` clip, in place: the clip is erased as one ``(C*T, H, W)`` image, so the box is the same
    in every frame (SlowFast's ``cube`` mode)."""

    def __init__(self, probability: float):
        self.probability = float(probability)
        self.erase = RandomErasing(self.probability, mode="pixel", max_count=1, num_splits=0,
                                   device="cpu")

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        c, t, h, w = clip.shape
        # timm erases in place and returns its input: use what it returns, which is `clip`'s
        # data when the reshape is a view and a copy otherwise (a non-contiguous clip)
        return self.erase(clip.reshape(c * t, h, w)).reshape(c, t, h, w)

    def __repr__(self):
        return f"ClipRandomErasing({self.probability})"


class RepeatedAugmentation:
    """A sample-dict transform applied `num_sample` times to the same decoded sample:
    ``"video"`` becomes ``(num_sample, C, T, H, W)``, the other keys are those of the first
    application. The transform must not change its input clip in place (the base pipeline's
    first step, the temporal subsampling, makes a new tensor)."""

    def __init__(self, transform: Callable[[dict], dict], num_sample: int):
        self.transform = transform
        self.num_sample = int(num_sample)

    def __call__(self, sample: dict) -> dict:
        outs = [self.transform(dict(sample)) for _ in range(self.num_sample)]
        first = outs[0]
        first["video"] = torch.stack([o["video"] for o in outs])
        return first


def flatten_repeated(batch: Dict[str, Any], num_sample: int) -> Dict[str, Any]:
    """A collated batch of :class:`RepeatedAugmentation` samples, ``"video"`` ``(B, S, C, T, H,
    W)``, as ``B * S`` clips (the samples of a video next to each other, as SlowFast's
    ``multiple_samples_collate``); the per-video tensors (labels, indices) are repeated."""
    if batch.get("video") is None or int(num_sample) == 1:
        return batch
    out = dict(batch)
    out["video"] = batch["video"].flatten(0, 1)
    for key in ("label", "video_index", "clip_index", "aug_index"):
        if batch.get(key) is not None:
            out[key] = batch[key].repeat_interleave(int(num_sample), dim=0)
    return out


class ClipMixer:
    """Mixup / CutMix of a batch with soft, label-smoothed targets (SlowFast's ``MIXUP``).

    With probability `prob` the batch is mixed with its reverse (pytorchvideo's ``CutMix`` with
    probability `switch_prob` when both are enabled, else ``MixUp``; an alpha of 0 disables
    that one), otherwise left as it is; the targets are the label-smoothed one-hots mixed with
    the same weight (CutMix: the weight of the box actually pasted).

    Args:
        num_classes: K of the targets.
        mixup_alpha, cutmix_alpha: Beta distribution parameters (0: off).
        prob: probability of mixing a batch.
        switch_prob: probability of CutMix rather than Mixup when both are on.
        label_smoothing: of the one-hot targets (``1 - s + s / K`` and ``s / K``).
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.1):
        self.num_classes = int(num_classes)
        self.prob, self.switch_prob = float(prob), float(switch_prob)
        self.label_smoothing = float(label_smoothing)
        s = self.label_smoothing
        self.mixup = (pvt.MixUp(float(mixup_alpha), s, self.num_classes)
                      if mixup_alpha > 0 else None)
        self.cutmix = (pvt.CutMix(float(cutmix_alpha), s, self.num_classes)
                       if cutmix_alpha > 0 else None)

    def __call__(self, videos: torch.Tensor, labels: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, T, H, W)`` clips (mixed in place) and ``(B,)`` labels -> clips, ``(B, K)``
        float targets."""
        draw = torch.rand(2).tolist()
        mix = None
        if videos.shape[0] > 1 and draw[0] < self.prob:
            mix = self.cutmix if self.mixup is None else self.mixup
            if self.mixup is not None and self.cutmix is not None and draw[1] < self.switch_prob:
                mix = self.cutmix
        if mix is None:
            return videos, convert_to_one_hot(labels, self.num_classes,
                                              self.label_smoothing).float()
        videos, targets = mix(videos, labels)
        return videos, targets.float()


def mixup_args(mixup: Optional[Mapping[str, Any]]) -> Optional[Dict[str, float]]:
    """The checked arguments of the ``train.mixup`` dict, missing keys at the official values
    (None: None). Raises ValueError for a key outside :data:`MIXUP_KEYS` or a value out of
    range."""
    if _is_off(mixup):
        return None
    if not isinstance(mixup, Mapping):
        raise ValueError(f"train.mixup must be a dict of {sorted(MIXUP_KEYS)} or None, got "
                         f"{mixup!r}")
    unknown = sorted(set(mixup) - set(MIXUP_KEYS))
    if unknown:
        raise ValueError(f"train.mixup: unknown key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)} (known: {', '.join(MIXUP_KEYS)})")
    args = {**MIXUP_KEYS, **{k: float(v) for k, v in mixup.items()}}
    for key in ("mixup_alpha", "cutmix_alpha"):
        if not (math.isfinite(args[key]) and args[key] >= 0):
            raise ValueError(f"train.mixup.{key} must be >= 0, got {args[key]}")
    for key in ("prob", "switch_prob"):
        if not 0 <= args[key] <= 1:
            raise ValueError(f"train.mixup.{key} must be in [0, 1], got {args[key]}")
    if not 0 <= args["label_smoothing"] < 1:
        raise ValueError(f"train.mixup.label_smoothing must be in [0, 1), got "
                         f"{args['label_smoothing']}")
    if args["mixup_alpha"] == 0 and args["cutmix_alpha"] == 0 and args["prob"] > 0:
        raise ValueError("train.mixup: mixup_alpha and cutmix_alpha are both 0 (set "
                         "train.mixup=None to turn mixing off)")
    return args


def build_clip_mixer(mixup: Optional[Mapping[str, Any]],
                     num_classes: Optional[int]) -> Optional[ClipMixer]:
    """A :class:`ClipMixer` of the ``train.mixup`` dict (None: None); ValueError as
    :func:`mixup_args`, or without a class count."""
    args = mixup_args(mixup)
    if args is None:
        return None
    if num_classes is None:
        raise ValueError("train.mixup needs the number of classes (the model has no Linear head)")
    return ClipMixer(int(num_classes), **args)


def check_train_augmentation(rand_augment: Optional[str] = None, random_erasing: float = 0.0,
                             num_sample: int = 1) -> None:
    """Raises ValueError for a RandAugment string that cannot be parsed, a random-erasing
    probability outside [0, 1] or a ``num_sample`` below 1."""
    parse_rand_augment(rand_augment)
    p = float(random_erasing)
    if not 0 <= p <= 1:
        raise ValueError(f"random_erasing must be a probability in [0, 1], got {random_erasing}")
    if int(num_sample) != num_sample or int(num_sample) < 1:
        raise ValueError(f"num_sample must be an integer >= 1, got {num_sample}")
