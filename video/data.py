"""Kinetics-style video data through ``pytorchvideo.data``, decoded with PyAV.

Data format: a Kinetics list file with one ``<path> <label>`` line per video (space separated,
as the Kinetics releases and SlowFast use; the path may itself contain spaces), or a directory
``<root>/<class>/<video>.mp4``. Relative paths are taken relative to ``video_path_prefix``,
which defaults to the folder of the list file.

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

Resume. A training sample is keyed by ``(epoch, position)`` in that order
(:class:`TrainClipDataset`, a map-style dataset) and made under RNGs seeded from ``(seed, rank,
epoch, position)``: its clip time, crop and flip do not depend on the DataLoader worker that made
it. :class:`VideoTrainLoader` batches the samples in the training process and records after each
batch where it is (``state_dict``: iteration, epoch, position); a run resumed from a checkpoint
holding that state continues with exactly the batches the uninterrupted run would have had.

Faults. pytorchvideo skips a video it cannot open or decode silently and raises after 10
consecutive failures. :class:`SkipCountingVideoDataset` reports every failure instead: a record
(path, reason) travels with the next sample (or alone at the end of a pass) through the
DataLoader workers to the main process, where the loaders log it once per file and count it; the
consecutive-failure limit is raised to the number of videos so that no run of bad files can stop
a pass. A failure costs nothing extra: no file is opened twice.
"""
import functools
import itertools
import logging
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Set

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from pytorchvideo.data import LabeledVideoDataset, make_clip_sampler
from pytorchvideo.data.labeled_video_paths import LabeledVideoPaths
from pytorchvideo.data.video import VideoPathHandler

from revvit_d2.utils.seeding import derive_seed, seeded_rng

from .transforms import build_test_transform, build_train_transform

logger = logging.getLogger(__name__)

__all__ = [
    "NoReadableVideoError",
    "SkipRecord",
    "SkipCountingVideoDataset",
    "TrainClipDataset",
    "ShardSampler",
    "kinetics_dataset",
    "collate_video_batch",
    "VideoTrainLoader",
    "VideoTestLoader",
    "build_kinetics_train_loader",
    "build_kinetics_test_loader",
    "clip_duration",
    "iters_per_epoch",
    "read_video_list",
]


class NoReadableVideoError(RuntimeError):
    """A whole pass over the training list produced no clip (every video is unreadable)."""


class SkipRecord(NamedTuple):
    """A video (or one of its clips) that could not be used, and why."""

    path: str
    reason: str


def clip_duration(num_frames: int, sampling_rate: int, target_fps: float) -> Fraction:
    """Seconds covered by one clip: ``num_frames * sampling_rate`` frames at ``target_fps``."""
    return Fraction(int(num_frames) * int(sampling_rate)) / Fraction(target_fps)


def _dist_info():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------
class _ReportingVideo:
    """Proxy of a pytorchvideo ``Video`` whose failed ``get_clip`` calls are reported."""

    def __init__(self, video, path: str, report: Callable[[str, str], None]):
        self._video = video
        self._path = path
        self._report = report

    def get_clip(self, start_sec, end_sec):
        try:
            clip = self._video.get_clip(start_sec, end_sec)
        except Exception as e:  # noqa: BLE001 - any decoder error means "skip this video"
            self._report(self._path, f"decoding [{float(start_sec):.2f}, {float(end_sec):.2f}) s "
                                     f"failed: {type(e).__name__}: {e}")
            return {"video": None, "audio": None}
        if clip is None or clip.get("video") is None:
            self._report(self._path, f"no frame decoded in [{float(start_sec):.2f}, "
                                     f"{float(end_sec):.2f}) s of a {float(self.duration):.2f} s "
                                     f"video (truncated or corrupt)")
        return clip

    def __getattr__(self, name):
        return getattr(self._video, name)


class _ReportingPathHandler(VideoPathHandler):
    """``VideoPathHandler`` that reports the files it cannot open (and re-raises, so that
    pytorchvideo skips them as before)."""

    def __init__(self, report: Callable[[str, str], None]):
        super().__init__()
        self._report = report

    def video_from_path(self, filepath, decode_audio=False, decoder="pyav", fps=30):
        try:
            if os.path.isfile(filepath) and os.path.getsize(filepath) == 0:
                raise RuntimeError("empty file")
            video = super().video_from_path(filepath, decode_audio=decode_audio, decoder=decoder,
                                            fps=fps)
            if video.duration is None or float(video.duration) <= 0:
                video.close()
                raise RuntimeError(f"no usable duration ({video.duration})")
        except Exception as e:
            reason = "file not found" if isinstance(e, FileNotFoundError) else \
                f"cannot open: {type(e).__name__}: {' '.join(str(e).split())}"
            self._report(str(filepath), reason)
            raise
        return _ReportingVideo(video, str(filepath), self._report)


class _ReportingTransform:
    """Runs the user transform; a transform error skips (and reports) the clip instead of
    ending the pass (pytorchvideo skips a sample whose transform returns None)."""

    def __init__(self, transform: Callable[[dict], Any], dataset: "_SkipReporting"):
        self.transform = transform
        self.dataset = dataset

    def __call__(self, sample: dict):
        try:
            return self.transform(sample)
        except Exception as e:  # noqa: BLE001
            path = self.dataset.video_path(int(sample.get("video_index", -1)))
            self.dataset._report(path, f"transform failed: {type(e).__name__}: {e}")
            return None


class _SkipReporting:
    """Failure records of a dataset (``self.labeled_video_paths``): :meth:`_report` collects
    them until :meth:`_take_reports` hands them over with the next sample."""

    def _report(self, path: str, reason: str):
        self._pending.append(SkipRecord(path, reason))

    def _take_reports(self) -> List[SkipRecord]:
        records, self._pending = self._pending, []
        return records

    def video_path(self, index: int) -> str:
        if 0 <= index < len(self.labeled_video_paths):
            return self.labeled_video_paths[index][0]
        return "<unknown>"


class SkipCountingVideoDataset(_SkipReporting, LabeledVideoDataset):
    """pytorchvideo's ``LabeledVideoDataset`` (same arguments, same samples) that reports the
    videos it skips.

    Every sample gets a ``"skipped"`` entry: the :class:`SkipRecord` s of the failures since the
    previous sample. When a pass ends with failures still pending, one last sample
    ``{"video": None, "skipped": [...]}`` carries them; :func:`collate_video_batch` drops such
    samples from the batch and keeps their records. Samples also get ``"video_index"`` (as in
    pytorchvideo) so that test views can be grouped per video.
    """

    def __init__(self, labeled_video_paths: LabeledVideoPaths, clip_sampler,
                 video_sampler=torch.utils.data.RandomSampler,
                 transform: Optional[Callable[[dict], Any]] = None, decoder: str = "pyav"):
        wrapped = None if transform is None else _ReportingTransform(transform, self)
        super().__init__(labeled_video_paths, clip_sampler, video_sampler, transform=wrapped,
                         decode_audio=False, decoder=decoder)
        self.labeled_video_paths = labeled_video_paths  # all videos (every rank), in list order
        self._pending: List[SkipRecord] = []
        self.video_path_handler = _ReportingPathHandler(self._report)
        # Each failing video costs one "try"; never give up inside a pass because of a run of
        # bad files (the sampler ends the pass).
        self._MAX_CONSECUTIVE_FAILURES = len(labeled_video_paths) + 1

    def __next__(self) -> dict:
        try:
            sample = super().__next__()
        except StopIteration:
            if self._pending:
                return {"video": None, "skipped": self._take_reports()}
            raise
        sample["skipped"] = self._take_reports()
        return sample


class TrainClipDataset(_SkipReporting, torch.utils.data.Dataset):
    """Training clips by key ``(epoch, position)``: the video at ``position`` (modulo this
    rank's share) of the epoch's shuffled order, one clip from the clip sampler, the transform.

    Python, numpy and torch RNGs are seeded from ``(seed, rank, epoch, position)`` for the whole
    sample (pytorchvideo's random clip sampler draws from ``random``, its crops from torch), so
    a sample is the same whichever worker makes it and whenever. A video that cannot be opened
    or decoded, or whose transform fails, gives ``{"video": None, "skipped": [SkipRecord]}``;
    good samples carry ``"skipped": []`` and the keys of pytorchvideo's samples.

    Args:
        labeled_video_paths: all videos (every rank), in list order.
        clip_sampler: a pytorchvideo clip sampler (one clip per video: ``"random"``).
        transform: sample dict -> sample dict.
        seed: seed of the orders (``DistributedSampler``) and of the samples.
        num_replicas, rank: this process's share of each epoch (``DistributedSampler``).
    """

    def __init__(self, labeled_video_paths: LabeledVideoPaths, clip_sampler,
                 transform: Optional[Callable[[dict], Any]] = None, *, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, decoder: str = "pyav"):
        self.labeled_video_paths = labeled_video_paths
        self.clip_sampler = clip_sampler
        self.transform = None if transform is None else _ReportingTransform(transform, self)
        self.seed, self.rank, self.decoder = int(seed), int(rank), decoder
        self.order_sampler = DistributedSampler(range(len(labeled_video_paths)), num_replicas,
                                                rank, shuffle=True, seed=int(seed),
                                                drop_last=False)
        self._order: Dict[int, List[int]] = {}
        self._pending: List[SkipRecord] = []
        self.video_path_handler = _ReportingPathHandler(self._report)

    def __len__(self) -> int:
        """Videos of this rank per epoch."""
        return len(self.order_sampler)

    def order(self, epoch: int) -> List[int]:
        """This rank's video indices for `epoch`."""
        if epoch not in self._order:
            self.order_sampler.set_epoch(epoch)
            self._order = {epoch: list(self.order_sampler)}
        return self._order[epoch]

    def __getitem__(self, key) -> dict:
        epoch, position = (int(k) for k in key)
        order = self.order(epoch)
        index = order[position % len(order)]
        self._pending = []
        with seeded_rng(derive_seed(self.seed, self.rank, epoch, position)):
            sample = self._clip(index)
        if sample is None:
            return {"video": None, "skipped": self._take_reports()}
        sample["skipped"] = self._take_reports()
        return sample

    def _clip(self, index: int) -> Optional[dict]:
        path, info = self.labeled_video_paths[index]
        try:
            video = self.video_path_handler.video_from_path(path, decode_audio=False,
                                                            decoder=self.decoder)
        except Exception:  # noqa: BLE001 - reported by the path handler
            return None
        try:
            self.clip_sampler.reset()
            start, end, clip_index, aug_index, _ = self.clip_sampler(0.0, video.duration, info)
            clip = video.get_clip(start, end)  # failures are reported by _ReportingVideo
            name = video.name
        finally:
            video.close()
        if clip is None or clip.get("video") is None:
            return None
        sample = {"video": clip["video"], "video_name": name, "video_index": index,
                  "clip_index": clip_index, "aug_index": aug_index, **info}
        return sample if self.transform is None else self.transform(sample)


class ShardSampler(Sampler):
    """Videos ``rank, rank + world, ...`` in order: each test video on exactly one rank (no
    padding or duplicates, unlike ``DistributedSampler``)."""

    def __init__(self, data_source, num_replicas: int = 1, rank: int = 0):
        self.n = len(data_source)
        self.num_replicas, self.rank = int(num_replicas), int(rank)

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self):
        return len(range(self.rank, self.n, self.num_replicas))


def read_video_list(data_path: str, video_path_prefix: Optional[str] = None) -> LabeledVideoPaths:
    """Read a Kinetics list file (``<path> <label>`` lines) or a ``<root>/<class>/<video>``
    directory with pytorchvideo's ``LabeledVideoPaths``, checking it first.

    Raises:
        FileNotFoundError: `data_path` does not exist.
        ValueError: the list is empty or has a malformed line.
    """
    path = Path(os.path.expanduser(str(data_path)))
    if not path.exists():
        raise FileNotFoundError(f"video list not found: {path}")
    if path.is_file():
        lines = [l for l in path.read_text().splitlines() if l.strip()]
        if not lines:
            raise ValueError(f"video list {path} is empty")
        for n, line in enumerate(lines, 1):
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{path}:{n}: expected '<path> <integer label>', got {line!r}")
        if video_path_prefix is None:
            video_path_prefix = str(path.parent)
    try:
        paths = LabeledVideoPaths.from_path(str(path))
    except AssertionError as e:  # pytorchvideo asserts on an empty folder
        raise ValueError(f"no videos in {path}: {e}") from None
    paths.path_prefix = video_path_prefix or ""
    return paths


def kinetics_dataset(data_path: str, clip_sampler, video_sampler=torch.utils.data.RandomSampler,
                     transform: Optional[Callable[[dict], Any]] = None,
                     video_path_prefix: Optional[str] = None,
                     decoder: str = "pyav") -> SkipCountingVideoDataset:
    """``pytorchvideo.data.Kinetics`` with skip counting (:class:`SkipCountingVideoDataset`);
    audio is not decoded."""
    paths = read_video_list(data_path, video_path_prefix)
    return SkipCountingVideoDataset(paths, clip_sampler, video_sampler, transform, decoder)


def collate_video_batch(samples: Sequence[dict]) -> Dict[str, Any]:
    """Batch samples of :class:`SkipCountingVideoDataset`.

    Returns:
        ``{"video": (B, C, T, H, W), "label", "video_index", "clip_index", "aug_index": (B,)
        long tensors, "skipped": [SkipRecord]}``; ``"video"`` and the tensors are None when no
        sample of the batch has a clip.
    """
    skipped = [r for s in samples for r in s.get("skipped", ())]
    good = [s for s in samples if s.get("video") is not None]
    out: Dict[str, Any] = {"skipped": skipped}
    if not good:
        out.update(video=None, label=None, video_index=None, clip_index=None, aug_index=None)
        return out
    out["video"] = torch.stack([s["video"] for s in good])
    for key in ("label", "video_index", "clip_index", "aug_index"):
        out[key] = torch.as_tensor([int(s.get(key, 0)) for s in good], dtype=torch.long)
    return out


class _SkipLog:
    """Logs each unreadable file once (per loader) and counts skip events and files."""

    def __init__(self, what: str):
        self.what = what
        self.paths: Set[str] = set()
        self.events = 0

    def add(self, records: Sequence[SkipRecord]):
        for r in records:
            self.events += 1
            if r.path not in self.paths:
                self.paths.add(r.path)
                logger.warning("skipping %s video %s: %s", self.what, r.path, r.reason)


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
    """

    def __init__(self, dataset: TrainClipDataset, batch_size: int, num_workers: int,
                 iters_per_epoch: int, pin_memory: bool = False):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.iters_per_epoch = max(1, int(iters_per_epoch))
        self.num_workers = max(0, int(num_workers))
        self.pin_memory = bool(pin_memory)
        self.start_iter = 0
        self.skipped = _SkipLog("training")
        self.epoch = 0
        self._cursor: Dict[str, int] = {}
        self._resume: Dict[str, int] = {}

    @property
    def num_videos(self) -> int:
        """Videos in the list (all ranks)."""
        return len(self.dataset.labeled_video_paths)

    def state_dict(self) -> Dict[str, int]:
        """``{"iteration", "epoch", "position"}`` of the last batch handed out (empty before)."""
        return dict(self._cursor)

    def load_state_dict(self, state: Dict[str, int]):
        self._resume = dict(state or {})

    def _start(self):
        epoch, done = divmod(int(self.start_iter), self.iters_per_epoch)
        position = done * self.batch_size
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
                            f"no training video could be read in a whole pass over "
                            f"{self.num_videos} videos ({len(self.skipped.paths)} unreadable)")
                    continue
                misses = 0
                pending.append(sample)
                if len(pending) < self.batch_size:
                    continue
                batch, pending = collate_video_batch(pending), []
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
        num_videos: videos in the list (all ranks).
        views_per_video: ``num_clips * num_crops``.
        skipped: :class:`_SkipLog` of this rank (paths and events).
    """

    def __init__(self, dataset: SkipCountingVideoDataset, batch_size: int, num_workers: int,
                 views_per_video: int, pin_memory: bool = False):
        self.dataset = dataset
        self.views_per_video = int(views_per_video)
        self.loader = _make_loader(dataset, batch_size, num_workers, pin_memory)
        self.skipped = _SkipLog("test")

    @property
    def num_videos(self) -> int:
        return len(self.dataset.labeled_video_paths)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        self.skipped = _SkipLog("test")
        for batch in self.loader:
            self.skipped.add(batch["skipped"])
            yield batch


def build_kinetics_train_loader(data_path: str, *, num_frames: int = 16, sampling_rate: int = 4,
                                target_fps: float = 30, crop_size: int = 224,
                                jitter_scales_relative: Sequence[float] = (0.08, 1.0),
                                jitter_aspect_relative: Sequence[float] = (0.75, 1.3333),
                                hflip_prob: float = 0.5,
                                mean: Sequence[float] = (0.45, 0.45, 0.45),
                                std: Sequence[float] = (0.225, 0.225, 0.225),
                                total_batch_size: int = 64, num_workers: int = 8,
                                seed: int = 0, video_path_prefix: Optional[str] = None,
                                pin_memory: Optional[bool] = None) -> VideoTrainLoader:
    """Training loader of the official recipe (random clip, scale/aspect jitter, flip).

    Args:
        data_path: Kinetics list file (``<path> <label>`` lines) or class-folder directory.
        num_frames, sampling_rate, target_fps: clip = ``num_frames * sampling_rate`` frames at
            ``target_fps`` (seconds = ``16 * 4 / 30``), subsampled to ``num_frames``.
        crop_size, jitter_scales_relative, jitter_aspect_relative, hflip_prob, mean, std: see
            :func:`revvit_video.transforms.build_train_transform`.
        total_batch_size: clips per iteration over all processes (divisible by the world size).
        num_workers: DataLoader worker processes per process.
        seed: seed of the per-epoch shuffling (``DistributedSampler(seed=...)``) and of the
            clip times and augmentations (see :class:`TrainClipDataset`).
        video_path_prefix: prefix of relative list paths (default: the list file's folder).
        pin_memory: default: when CUDA is available.
    """
    world, rank = _dist_info()
    if int(total_batch_size) % world:
        raise ValueError(f"total_batch_size {total_batch_size} is not divisible by the world size "
                         f"{world}")
    batch = int(total_batch_size) // world
    transform = build_train_transform(num_frames, crop_size, jitter_scales_relative,
                                      jitter_aspect_relative, hflip_prob, mean, std)
    dataset = TrainClipDataset(
        read_video_list(data_path, video_path_prefix),
        make_clip_sampler("random", clip_duration(num_frames, sampling_rate, target_fps)),
        transform, seed=int(seed), num_replicas=world, rank=rank)
    per_rank = len(dataset)
    if per_rank < batch:
        logger.warning("%d videos per process but %d clips per batch: an epoch is one batch",
                       per_rank, batch)
    pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    return VideoTrainLoader(dataset, batch, num_workers, per_rank // batch, pin)


def build_kinetics_test_loader(data_path: str, *, num_frames: int = 16, sampling_rate: int = 4,
                               target_fps: float = 30, num_clips: int = 5, num_crops: int = 1,
                               short_side: int = 224, crop_size: int = 224,
                               mean: Sequence[float] = (0.45, 0.45, 0.45),
                               std: Sequence[float] = (0.225, 0.225, 0.225),
                               batch_size: int = 8, num_workers: int = 8,
                               video_path_prefix: Optional[str] = None,
                               pin_memory: Optional[bool] = None) -> VideoTestLoader:
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
        sampler, transform, video_path_prefix)
    pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    return VideoTestLoader(dataset, batch_size, num_workers, int(num_clips) * int(num_crops), pin)


def iters_per_epoch(num_videos: int, total_batch_size: int, world_size: int = 1) -> int:
    """``floor(ceil(num_videos / world_size) / (total_batch_size / world_size))``, at least 1."""
    per_rank = math.ceil(int(num_videos) / int(world_size))
    return max(1, per_rank // (int(total_batch_size) // int(world_size)))
