"""Kinetics training and test loaders of the official recipe, over :mod:`revvit_video.datasets`.

Sampling (official REV_MVIT_B_16x4; see :mod:`revvit_video.transforms` for the pixels):

* a clip spans ``num_frames * sampling_rate / target_fps`` seconds (16 x 4 / 30 = 2.13 s), of
  which ``num_frames`` frames are taken uniformly;
* training: one clip at a random time per video and epoch (pytorchvideo's ``"random"`` clip
  sampler);
* testing: ``num_clips`` clips per video at uniformly spaced start times (``"constant_clips_per_
  video"``: start ``k * (duration - clip) / num_clips``, k = 0..num_clips-1, SlowFast's test
  sampling) x ``num_crops`` spatial crops; every view carries its ``video_index`` so that views are
  aggregated per video (:mod:`revvit_video.engine`).

Epochs. Training is iteration-based: one epoch is ``iters_per_epoch = floor(ceil(N / world_size)
/ batch_size)`` iterations (N videos in the list), the same on every rank, so distributed ranks
always run the same number of steps whatever is skipped. Each epoch reshuffles the video order
(``DistributedSampler(seed=...).set_epoch(epoch)``, also in a single process); if unreadable
videos make the order run out, it is restarted to fill the epoch.

Recipe (:mod:`revvit_video.augment`, each optional): RandAugment, random erasing, repeated
augmentation (``num_sample`` clips per decoded video, adjacent in the batch: ``total_batch_size
/ num_sample`` videos per batch) and Mixup/CutMix (:attr:`VideoTrainLoader.mix`, seeded by the
batch's place in the stream; labels become ``(B, K)`` soft targets).

Resume. :class:`VideoTrainLoader` batches the samples of a
:class:`~revvit_video.datasets.TrainClipDataset` (keyed by ``(epoch, position)``, seeded per
key) in the training process and records after each batch where it is (``state_dict``:
iteration, epoch, position); a run resumed from a checkpoint holding that state continues with
exactly the batches the uninterrupted run would have had.

Faults. Entries that cannot be used (unreadable, missing or empty files, no video stream, clips
that decode to no frame, malformed list lines, labels out of range) are reported by the datasets
(:mod:`revvit_video.datasets`); the loaders log each with its reason the first time this process
meets it and count distinct entries per reason (``loader.skipped``,
:meth:`VideoTestLoader.skipped_entries`). A video shorter than one clip (it ends before the last
frame of a clip, ``(num_frames - 1) * sampling_rate / target_fps`` seconds:
:func:`min_video_duration`) is used, not skipped: its clip starts at 0 and repeats frames to
fill ``num_frames``, as the official SlowFast decoder and pytorchvideo do, so the dataset has
the official size. The datasets can still skip such videos (``min_duration``; reason ``too
short``); the loaders do not ask them to, and tools/check_dataset.py reports them as a warning.

The dataset names (``SkipCountingVideoDataset``, ``TrainClipDataset``, ``read_video_list``, ...)
are importable from here too.
"""
import functools
import collections
import itertools
import logging
import math
from fractions import Fraction
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from pytorchvideo.data import make_clip_sampler
from torch.utils.data import DataLoader, Sampler

from revvit_d2.utils.errors import UserError
from revvit_d2.utils.seeding import derive_seed, seeded_rng

from .augment import RepeatedAugmentation, check_train_augmentation, flatten_repeated

from .datasets import __all__ as _DATASET_NAMES
from .datasets import (SKIP_REASONS, ShardSampler, SkipCountingVideoDataset,  # noqa: F401
                       SkipRecord, TrainClipDataset, VideoList, collate_video_batch,
                       kinetics_dataset, read_video_list)
from .transforms import build_test_transform, build_train_transform

logger = logging.getLogger(__name__)

__all__ = [
    "NoReadableVideoError",
    "VideoTrainLoader",
    "VideoTestLoader",
    "build_kinetics_train_loader",
    "build_kinetics_test_loader",
    "clip_duration",
    "min_video_duration",
    "model_num_classes",
    "format_skip_counts",
    "iters_per_epoch",
] + _DATASET_NAMES


class NoReadableVideoError(UserError, RuntimeError):
    """A whole pass over the training list produced no clip: an input error (one line)."""


def clip_duration(num_frames: int, sampling_rate: int, target_fps: float) -> Fraction:
    """Seconds covered by one clip: ``num_frames * sampling_rate`` frames at ``target_fps``."""
    return Fraction(int(num_frames) * int(sampling_rate)) / Fraction(target_fps)


def min_video_duration(num_frames: int, sampling_rate: int, target_fps: float) -> float:
    """Seconds a video needs for one clip: its last frame is ``(num_frames - 1) *
    sampling_rate`` frames at ``target_fps`` after its first."""
    return (int(num_frames) - 1) * int(sampling_rate) / float(target_fps)


def format_skip_counts(counts: Mapping[str, int]) -> str:
    """``"2 file not found, 1 no video stream"`` (largest first), or ``"none"``."""
    items = sorted(((n, r) for r, n in counts.items() if n), key=lambda x: (-x[0], x[1]))
    return ", ".join(f"{n} {r}" for n, r in items) or "none"


def skip_counts(entries: Mapping[str, str]) -> Dict[str, int]:
    """``{reason: distinct entries}`` of ``{entry: reason}``."""
    return dict(collections.Counter(entries.values()))


def _dist_info():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0



# (what, path) already logged by this process: a file is named once however many loaders (one
# test loader per evaluation) or epochs meet it.
_WARNED: Set[Tuple[str, str]] = set()


class _SkipLog:
    """The entries one loader could not use: each logged the first time this process meets it
    (one warning: path, reason, detail), counted once (:attr:`first`: entry -> first
    :class:`SkipRecord`); :attr:`events` counts every skip."""

    def __init__(self, what: str):
        self.what = what
        self.first: Dict[str, SkipRecord] = {}
        self.events = 0

    @property
    def paths(self):
        """The distinct entries skipped (video files, or ``<list>:<line>``)."""
        return self.first.keys()

    def entries(self) -> Dict[str, str]:
        """``{entry: reason}``."""
        return {p: r.reason for p, r in self.first.items()}

    def counts(self) -> Dict[str, int]:
        """``{reason: distinct entries}``."""
        return skip_counts(self.entries())

    def add(self, records: Sequence[SkipRecord]):
        for r in records:
            self.events += 1
            if r.path in self.first:
                continue
            self.first[r.path] = r
            if (self.what, r.path) not in _WARNED:
                _WARNED.add((self.what, r.path))
                logger.warning("skipping %s video %s: %s%s", self.what, r.path, r.reason,
                               f" ({r.detail})" if r.detail else "")


def _make_loader(dataset, batch_size, num_workers, pin_memory):
    workers = max(0, int(num_workers))
    return DataLoader(dataset, batch_size=int(batch_size), num_workers=workers,
                      collate_fn=collate_video_batch, pin_memory=pin_memory, drop_last=False,
                      persistent_workers=False)


def _as_is(sample):
    return sample


class _EpochPositions(Sampler):
    """Keys ``(epoch, start), (epoch, start + 1), ...`` without end."""

    def __init__(self, epoch: int, start: int):
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self):
        return ((self.epoch, p) for p in itertools.count(self.start))


class VideoTrainLoader:
    """Endless iterable of training batches, ``iters_per_epoch`` batches per epoch.

    ``iter(loader)`` starts at iteration :attr:`start_iter` (epoch ``start_iter //
    iters_per_epoch``). DataLoader workers make single samples of :class:`TrainClipDataset` in
    key order; this process drops the unreadable ones (logged once per file, counted in
    :attr:`skipped`) and batches the others, so every batch is full. :meth:`state_dict` tells
    where the last batch ended; after :meth:`load_state_dict` of that state, a loader started
    at the next iteration continues exactly there (without it, a start inside an epoch assumes
    that no video of the epoch was skipped before it).

    A batch holds ``batch_size`` clips of ``batch_size / num_sample`` videos (``num_sample`` > 1:
    the dataset's transform is a :class:`RepeatedAugmentation`). :attr:`mix` (a
    :class:`~revvit_video.augment.ClipMixer` or None) maps each batch's clips and labels.
    """

    def __init__(self, dataset: TrainClipDataset, batch_size: int, num_workers: int,
                 iters_per_epoch: int, pin_memory: bool = False, num_sample: int = 1,
                 mix: Optional[Any] = None):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.num_sample = int(num_sample)
        if self.batch_size % self.num_sample:
            raise ValueError(f"{self.batch_size} clips per batch are not a multiple of "
                             f"num_sample {self.num_sample}")
        self.videos_per_batch = self.batch_size // self.num_sample
        self.mix = mix
        self.iters_per_epoch = max(1, int(iters_per_epoch))
        self.num_workers = max(0, int(num_workers))
        self.pin_memory = bool(pin_memory)
        self.start_iter = 0
        self.skipped = _SkipLog("training")
        self.skipped.add(getattr(dataset.labeled_video_paths, "rejected", ()))
        self.epoch = 0
        self._cursor: Dict[str, int] = {}
        self._resume: Dict[str, int] = {}

    @property
    def num_videos(self) -> int:
        """Entries of the list (all ranks), the rejected lines included."""
        return _num_entries(self.dataset.labeled_video_paths)

    def state_dict(self) -> Dict[str, int]:
        """``{"iteration", "epoch", "position"}`` of the last batch handed out (empty before)."""
        return dict(self._cursor)

    def load_state_dict(self, state: Dict[str, int]):
        self._resume = dict(state or {})

    def _start(self):
        epoch, done = divmod(int(self.start_iter), self.iters_per_epoch)
        position = done * self.videos_per_batch
        saved = self._resume
        if done and saved.get("iteration") == self.start_iter - 1 and saved.get("epoch") == epoch:
            position = int(saved["position"])
        elif done:
            logger.warning("starting inside epoch %d without the loader state of iteration %d: "
                           "the epoch continues at its video %d", epoch, self.start_iter - 1,
                           position)
        return epoch, done, position

    def _samples(self, epoch: int, start: int):
        # A generator of its own: the DataLoader draws its workers' base seed from it, not from
        # the global RNG of the training step (drop path) that starts the epoch.
        seed = derive_seed(self.dataset.seed, self.dataset.rank, epoch)
        return DataLoader(self.dataset, sampler=_EpochPositions(epoch, start), batch_size=None,
                          num_workers=self.num_workers, collate_fn=_as_is,
                          generator=torch.Generator().manual_seed(seed))

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        epoch, done, position = self._start()
        iteration = int(self.start_iter)
        while True:
            self.epoch = epoch
            pending: List[dict] = []
            misses = 0
            for sample in self._samples(epoch, position):
                position += 1
                self.skipped.add(sample["skipped"])
                if sample["video"] is None:
                    misses += 1
                    if misses >= len(self.dataset):
                        raise NoReadableVideoError(
                            f"no training video could be used in a whole pass over "
                            f"{self.num_videos} list entries ({len(self.skipped.paths)} "
                            f"skipped: {format_skip_counts(self.skipped.counts())})")
                    continue
                misses = 0
                pending.append(sample)
                if len(pending) < self.videos_per_batch:
                    continue
                batch = flatten_repeated(collate_video_batch(pending), self.num_sample)
                pending = []
                if self.mix is not None:
                    with seeded_rng(derive_seed(self.dataset.seed, self.dataset.rank, epoch,
                                                position, 1)):
                        batch["video"], batch["label"] = self.mix(batch["video"], batch["label"])
                if self.pin_memory:
                    batch["video"], batch["label"] = (batch["video"].pin_memory(),
                                                      batch["label"].pin_memory())
                self._cursor = dict(iteration=iteration, epoch=epoch, position=position)
                yield batch
                iteration += 1
                done += 1
                if done == self.iters_per_epoch:
                    break
            epoch, done, position = epoch + 1, 0, 0


class VideoTestLoader:
    """One ordered pass over the test views of this rank's share of the videos.

    Attributes:
        num_videos: entries of the list (all ranks), the rejected lines included.
        views_per_video: ``num_clips * num_crops``.
        skipped: :class:`_SkipLog` of this rank's last pass (every entry met with a problem,
            also those of which some views were made: see :meth:`skipped_entries`).
    """

    def __init__(self, dataset: SkipCountingVideoDataset, batch_size: int, num_workers: int,
                 views_per_video: int, pin_memory: bool = False):
        self.dataset = dataset
        self.views_per_video = int(views_per_video)
        self.loader = _make_loader(dataset, batch_size, num_workers, pin_memory)
        self.skipped = _SkipLog("test")
        self._viewed: Set[int] = set()

    @property
    def num_videos(self) -> int:
        return _num_entries(self.dataset.labeled_video_paths)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        self.skipped = _SkipLog("test")
        self._viewed = set()
        self.skipped.add(getattr(self.dataset.labeled_video_paths, "rejected", ()))
        for batch in self.loader:
            self.skipped.add(batch["skipped"])
            if batch["video_index"] is not None:
                self._viewed.update(batch["video_index"].tolist())
            yield batch

    def skipped_entries(self) -> Dict[str, str]:
        """``{entry: reason}`` of the last pass: the entries of this rank's share without any
        view (a video some of whose clips failed is not skipped: it counts as incomplete) and
        the rejected list lines (every rank has them)."""
        viewed = {self.dataset.video_path(i) for i in self._viewed}
        out = {p: r for p, r in self.skipped.entries().items() if p not in viewed}
        for i in self.dataset.video_sampler:  # this rank's share
            path = self.dataset.video_path(i)
            if i not in self._viewed and path not in viewed:
                out.setdefault(path, "no clip made")
        return out


def _num_entries(paths) -> int:
    return int(getattr(paths, "num_entries", len(paths)))


def build_kinetics_train_loader(data_path: str, *, num_frames: int = 16, sampling_rate: int = 4,
                                target_fps: float = 30, crop_size: int = 224,
                                jitter_scales_relative: Sequence[float] = (0.08, 1.0),
                                jitter_aspect_relative: Sequence[float] = (0.75, 1.3333),
                                hflip_prob: float = 0.5,
                                mean: Sequence[float] = (0.45, 0.45, 0.45),
                                std: Sequence[float] = (0.225, 0.225, 0.225),
                                total_batch_size: int = 64, num_workers: int = 8,
                                seed: int = 0, video_path_prefix: Optional[str] = None,
                                pin_memory: Optional[bool] = None,
                                num_classes: Optional[int] = None,
                                rand_augment: Optional[str] = None, random_erasing: float = 0.0,
                                num_sample: int = 1) -> VideoTrainLoader:
    """Training loader of the official recipe (random clip, scale/aspect jitter, flip; optional
    RandAugment, random erasing, repeated augmentation; Mixup/CutMix: :attr:`VideoTrainLoader.mix`).

    Args:
        data_path: Kinetics list file (``<path> <label>`` lines) or class-folder directory.
        num_frames, sampling_rate, target_fps: clip = ``num_frames * sampling_rate`` frames at
            ``target_fps`` (seconds = ``16 * 4 / 30``), subsampled to ``num_frames``.
        crop_size, jitter_scales_relative, jitter_aspect_relative, hflip_prob, mean, std: see
            :func:`revvit_video.transforms.build_train_transform`.
        total_batch_size: clips per iteration over all processes (divisible by the world size
            times `num_sample`).
        num_workers: DataLoader worker processes per process.
        seed: seed of the per-epoch shuffling (``DistributedSampler(seed=...)``) and of the
            clip times and augmentations (see :class:`TrainClipDataset`).
        video_path_prefix: prefix of relative list paths (default: the list file's folder).
        pin_memory: default: when CUDA is available.
        num_classes: list lines with a label outside ``[0, num_classes)`` are skipped
            (tools/run_video.py sets it from the model).
        rand_augment: RandAugment string (``"rand-m7-n4-mstd0.5-inc1"``) or None (off).
        random_erasing: probability of erasing a box of each clip (0: off).
        num_sample: augmented clips per decoded video (1: off; official 2).
    """
    check_train_augmentation(rand_augment, random_erasing, num_sample)
    world, rank = _dist_info()
    if int(total_batch_size) % (world * int(num_sample)):
        raise ValueError(f"total_batch_size {total_batch_size} is not divisible by the world size "
                         f"{world} times num_sample {num_sample}")
    batch = int(total_batch_size) // world
    videos = batch // int(num_sample)
    transform = build_train_transform(num_frames, crop_size, jitter_scales_relative,
                                      jitter_aspect_relative, hflip_prob, mean, std,
                                      rand_augment, random_erasing)
    if int(num_sample) > 1:
        transform = RepeatedAugmentation(transform, num_sample)
    dataset = TrainClipDataset(
        read_video_list(data_path, video_path_prefix, num_classes),
        make_clip_sampler("random", clip_duration(num_frames, sampling_rate, target_fps)),
        transform, seed=int(seed), num_replicas=world, rank=rank,
        min_duration=None)  # short videos repeat frames (SlowFast, pytorchvideo): see Faults
    per_rank = len(dataset)
    if per_rank < videos:
        logger.warning("%d videos per process but %d per batch: an epoch is one batch",
                       per_rank, videos)
    pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    return VideoTrainLoader(dataset, batch, num_workers, per_rank // videos, pin,
                            num_sample=num_sample)


def build_kinetics_test_loader(data_path: str, *, num_frames: int = 16, sampling_rate: int = 4,
                               target_fps: float = 30, num_clips: int = 5, num_crops: int = 1,
                               short_side: int = 224, crop_size: int = 224,
                               mean: Sequence[float] = (0.45, 0.45, 0.45),
                               std: Sequence[float] = (0.225, 0.225, 0.225),
                               batch_size: int = 8, num_workers: int = 8,
                               video_path_prefix: Optional[str] = None,
                               pin_memory: Optional[bool] = None,
                               num_classes: Optional[int] = None) -> VideoTestLoader:
    """Multi-view test loader: ``num_clips`` uniform clips x ``num_crops`` crops per video.

    Args:
        data_path: Kinetics list file or class-folder directory.
        num_frames, sampling_rate, target_fps: clip definition as for training.
        num_clips: temporal clips per video (5 for REV_MVIT_B_16x4).
        num_crops: 1 (centre crop after resizing the short side to `short_side`) or 3 (left /
            centre / right, or top / centre / bottom, crops of the resized clip).
        short_side, crop_size, mean, std: see
            :func:`revvit_video.transforms.build_test_transform`.
        batch_size: views per batch and process.
        num_classes: list lines with a label outside ``[0, num_classes)`` are skipped.
    """
    if int(num_crops) not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    world, rank = _dist_info()
    transform = build_test_transform(num_frames, short_side, crop_size, mean, std,
                                     num_crops=int(num_crops))
    sampler = functools.partial(ShardSampler, num_replicas=world, rank=rank)
    dataset = kinetics_dataset(
        data_path, make_clip_sampler("constant_clips_per_video",
                                     clip_duration(num_frames, sampling_rate, target_fps),
                                     int(num_clips), int(num_crops)),
        sampler, transform, video_path_prefix, num_classes=num_classes,
        min_duration=None)  # short videos repeat frames (SlowFast, pytorchvideo): see Faults
    pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    return VideoTestLoader(dataset, batch_size, num_workers, int(num_clips) * int(num_crops), pin)


def iters_per_epoch(num_videos: int, total_batch_size: int, world_size: int = 1,
                    num_sample: int = 1) -> int:
    """``floor(ceil(num_videos / world_size) / (total_batch_size / world_size / num_sample))``
    (videos per process over videos per batch), at least 1."""
    per_rank = math.ceil(int(num_videos) / int(world_size))
    return max(1, per_rank // (int(total_batch_size) // int(world_size) // int(num_sample)))


def model_num_classes(model) -> Optional[int]:
    """The number of classes a video model predicts: the output size of the last ``Linear`` of
    its ``head`` (DDP unwrapped), or None when it has no such head."""
    head = getattr(getattr(model, "module", model), "head", None)
    if head is None:
        return None
    sizes = [m.out_features for m in head.modules() if isinstance(m, torch.nn.Linear)]
    return int(sizes[-1]) if sizes else None
