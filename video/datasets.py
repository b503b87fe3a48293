"""Kinetics-style video datasets through ``pytorchvideo.data``, decoded with PyAV, that report
every video they skip. The loaders built on them: :mod:`revvit_video.data`.

Data format: a Kinetics list file with one ``<path> <label>`` line per video (space separated,
as the Kinetics releases and SlowFast use; the path may itself contain spaces), or a directory
``<root>/<class>/<video>`` (classes numbered in sorted order, videos with one of
:data:`VIDEO_EXTENSIONS`, in sub-folders too). Relative paths are taken relative to
``video_path_prefix``, which defaults to the folder of the list file. Reading lists and the
skip reasons: :mod:`revvit_video.video_lists`.

Faults. pytorchvideo skips a video it cannot open or decode silently and raises after 10
consecutive failures. :class:`SkipCountingVideoDataset` reports every failure instead: a
:class:`SkipRecord` (path, reason, detail) travels with the next sample (or alone at the end of
a pass) through the DataLoader workers to the main process, where the loaders log it once per
file and count it; the consecutive-failure limit is raised to the number of videos so that no
run of bad files can stop a pass. List lines that cannot be used (:func:`read_video_list`) are
kept out of the dataset and reported the same way. The reasons are :data:`SKIP_REASONS`. A
failure costs nothing extra: no file is opened twice (a file pytorchvideo finds no video stream
in is probed once more, to tell an audio-only file from a truncated one).

Resume. :class:`TrainClipDataset` is map-style: a training sample is keyed by ``(epoch,
position)`` and made under RNGs seeded from ``(seed, rank, epoch, position)``, so its clip time,
crop and flip do not depend on the DataLoader worker that made it.
"""
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import av
import torch
from pytorchvideo.data import LabeledVideoDataset
from pytorchvideo.data.labeled_video_paths import LabeledVideoPaths
from pytorchvideo.data.video import VideoPathHandler
from torch.utils.data import DistributedSampler, Sampler

from revvit_d2.utils.errors import one_line
from revvit_d2.utils.seeding import derive_seed, seeded_rng

from .compat import install_functional_tensor_alias
from .video_lists import (DECODE_FAILED, EMPTY_FILE, FILE_NOT_FOUND,  # noqa: F401
                          NO_FRAME, NO_VIDEO_STREAM, SKIP_REASONS, TOO_SHORT, TRANSFORM_FAILED,
                          UNREADABLE, VIDEO_EXTENSIONS, SkipRecord, VideoList, read_video_list)

# DataLoader workers started with ``spawn`` import this module first when they unpickle a
# dataset, before its pytorchvideo transforms: those need the alias (see revvit_video.compat).
install_functional_tensor_alias()

__all__ = [
    "SKIP_REASONS",
    "VIDEO_EXTENSIONS",
    "VideoList",
    "SkipRecord",
    "SkipCountingVideoDataset",
    "TrainClipDataset",
    "ShardSampler",
    "kinetics_dataset",
    "collate_video_batch",
    "read_video_list",
]


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------
class _ReportingVideo:
    """Proxy of a pytorchvideo ``Video`` whose failed ``get_clip`` calls are reported."""

    def __init__(self, video, path: str, report: Callable[..., None]):
        self._video = video
        self._path = path
        self._report = report

    def get_clip(self, start_sec, end_sec):
        try:
            clip = self._video.get_clip(start_sec, end_sec)
        except Exception as e:  # noqa: BLE001 - any decoder error means "skip this video"
            self._report(self._path, DECODE_FAILED, f"clip [{float(start_sec):.2f}, "
                                                    f"{float(end_sec):.2f}) s: {one_line(e)}")
            return {"video": None, "audio": None}
        if clip is None or clip.get("video") is None:
            self._report(self._path, NO_FRAME, f"clip [{float(start_sec):.2f}, "
                                               f"{float(end_sec):.2f}) s of a "
                                               f"{float(self.duration):.2f} s video (truncated "
                                               f"or corrupt)")
        return clip

    def __getattr__(self, name):
        return getattr(self._video, name)


def _open_failure(path: str, error: Exception):
    """(reason, detail) of a file pytorchvideo could not open."""
    if isinstance(error, FileNotFoundError):
        return FILE_NOT_FOUND, ""
    if "Video stream not found" in str(error):  # pytorchvideo's words: tell why
        try:
            with av.open(path) as container:
                kinds = sorted({s.type for s in container.streams})
        except Exception as e:  # noqa: BLE001
            return UNREADABLE, one_line(e)
        if kinds:
            return NO_VIDEO_STREAM, f"streams: {', '.join(kinds)}"
        return UNREADABLE, "no stream found (truncated, or not a video file)"
    return UNREADABLE, one_line(error)


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class _ReportingPathHandler(VideoPathHandler):
    """``VideoPathHandler`` that reports the files it cannot open or that are shorter than
    `min_duration` seconds (and raises, so that pytorchvideo skips them as before)."""

    def __init__(self, report: Callable[..., None], min_duration: Optional[float] = None):
        super().__init__()
        self._report = report
        self.min_duration = min_duration

    def video_from_path(self, filepath, decode_audio=False, decoder="pyav", fps=30):
        path = str(filepath)
        try:
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                raise _Skip(EMPTY_FILE)
            try:
                video = super().video_from_path(filepath, decode_audio=decode_audio,
                                                decoder=decoder, fps=fps)
            except Exception as e:  # noqa: BLE001
                raise _Skip(*_open_failure(path, e)) from None
            duration = None if video.duration is None else float(video.duration)
            if duration is None or duration <= 0:
                video.close()
                raise _Skip(UNREADABLE, f"no usable duration ({video.duration})")
            if self.min_duration is not None and duration < self.min_duration:
                video.close()
                raise _Skip(TOO_SHORT, f"{duration:.3f} s; one clip at this sampling needs "
                                       f"{self.min_duration:.3f} s")
        except _Skip as e:
            self._report(path, e.reason, e.detail)
            raise
        return _ReportingVideo(video, path, self._report)


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
            self.dataset._report(path, TRANSFORM_FAILED, one_line(e))
            return None


class _SkipReporting:
    """Failure records of a dataset (``self.labeled_video_paths``): :meth:`_report` collects
    them until :meth:`_take_reports` hands them over with the next sample."""

    def _report(self, path: str, reason: str, detail: str = ""):
        self._pending.append(SkipRecord(path, reason, detail))

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
    pytorchvideo) so that test views can be grouped per video. A video shorter than
    `min_duration` seconds (when given) is skipped as too short; the loaders of
    :mod:`revvit_video.data` give None, so a short video is used with repeated frames, as in
    SlowFast and pytorchvideo.
    """

    def __init__(self, labeled_video_paths: LabeledVideoPaths, clip_sampler,
                 video_sampler=torch.utils.data.RandomSampler,
                 transform: Optional[Callable[[dict], Any]] = None, decoder: str = "pyav",
                 min_duration: Optional[float] = None):
        wrapped = None if transform is None else _ReportingTransform(transform, self)
        super().__init__(labeled_video_paths, clip_sampler, video_sampler, transform=wrapped,
                         decode_audio=False, decoder=decoder)
        self.labeled_video_paths = labeled_video_paths  # all videos (every rank), in list order
        self._pending: List[SkipRecord] = []
        self.video_path_handler = _ReportingPathHandler(self._report, min_duration)
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
        min_duration: videos shorter than this (seconds) are skipped as too short; None (the
            loaders' choice): used, their clip repeating frames as in SlowFast and pytorchvideo.
    """

    def __init__(self, labeled_video_paths: LabeledVideoPaths, clip_sampler,
                 transform: Optional[Callable[[dict], Any]] = None, *, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, decoder: str = "pyav",
                 min_duration: Optional[float] = None):
        self.labeled_video_paths = labeled_video_paths
        self.clip_sampler = clip_sampler
        self.transform = None if transform is None else _ReportingTransform(transform, self)
        self.seed, self.rank, self.decoder = int(seed), int(rank), decoder
        self.order_sampler = DistributedSampler(range(len(labeled_video_paths)), num_replicas,
                                                rank, shuffle=True, seed=int(seed),
                                                drop_last=False)
        self._order: Dict[int, List[int]] = {}
        self._pending: List[SkipRecord] = []
        self.video_path_handler = _ReportingPathHandler(self._report, min_duration)

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


def kinetics_dataset(data_path: str, clip_sampler, video_sampler=torch.utils.data.RandomSampler,
                     transform: Optional[Callable[[dict], Any]] = None,
                     video_path_prefix: Optional[str] = None,
                     decoder: str = "pyav", num_classes: Optional[int] = None,
                     min_duration: Optional[float] = None) -> SkipCountingVideoDataset:
    """``pytorchvideo.data.Kinetics`` with skip counting (:class:`SkipCountingVideoDataset`);
    audio is not decoded. The rejected list lines are in ``dataset.labeled_video_paths
    .rejected``. Videos shorter than `min_duration` seconds (when given) are skipped as too
    short; with None they are used, their clips repeating frames."""
    paths = read_video_list(data_path, video_path_prefix, num_classes)
    return SkipCountingVideoDataset(paths, clip_sampler, video_sampler, transform, decoder,
                                    min_duration)


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

