"""Preflight check of a Kinetics-format video dataset (``tools/check_dataset.py``): the list
read as the loaders read it, each video opened as the datasets open it (pytorchvideo's PyAV
decoder), one clip decoded as training decodes it, and then (unless ``quick``) every frame
decoded, so that a file that breaks half-way is found before the run, not on day two. The
report and worker machinery: :mod:`revvit_d2.data.preflight`.

Severities: what the loaders skip is an ``error``; a video shorter than one clip at the
sampling is a ``warning`` (``too short``): the loaders use it, repeating frames to fill the
clip, as the official SlowFast decoder and pytorchvideo do.
"""
import functools
from typing import List, Optional

import av

from revvit_d2.data.preflight import (ERROR, WARNING, Finding, PreflightReport,
                                      check_in_parallel)
from revvit_d2.utils.errors import one_line

from .datasets import _ReportingPathHandler
from .data import clip_duration, min_video_duration
from .video_lists import DECODE_FAILED, NO_FRAME, TOO_SHORT, UNREADABLE, read_video_list

__all__ = ["check_kinetics", "check_video_file"]


def _full_decode(path: str) -> List[Finding]:
    """Decode every frame of the first video stream; a decoder error or no frame at all is a
    finding naming the time reached."""
    frames, last = 0, 0.0
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                frames += 1
                if frame.time is not None:
                    last = float(frame.time)
    except Exception as e:  # noqa: BLE001 - any decoder error: report it
        return [Finding(path, DECODE_FAILED, f"after {frames} frame(s), at {last:.2f} s: "
                                             f"{one_line(e)}")]
    if frames == 0:
        return [Finding(path, NO_FRAME, "the video stream decodes to no frame")]
    return []


def check_video_file(path: str, clip_seconds: float, min_duration: float,
                     quick: bool = False) -> List[Finding]:
    """The problems of one video: opened with the loaders' path handler (missing, empty,
    unreadable, no video stream: errors), shorter than `min_duration` seconds (a warning), its
    first clip of `clip_seconds` decoded as in training (no frame, decoding failed: errors),
    then, unless `quick`, every frame decoded."""
    found: List[Finding] = []
    handler = _ReportingPathHandler(
        lambda where, reason, detail="": found.append(Finding(where, reason, detail, ERROR)))
    try:
        video = handler.video_from_path(path, decode_audio=False, decoder="pyav")
    except Exception:  # noqa: BLE001 - the handler reported why
        return found or [Finding(path, UNREADABLE, "could not be opened")]
    try:
        duration = float(video.duration)
        if duration < min_duration:
            found.append(Finding(path, TOO_SHORT, f"{duration:.3f} s; one clip at this sampling "
                                                  f"needs {min_duration:.3f} s: the loaders "
                                                  f"repeat frames to fill it", WARNING))
        clip = video.get_clip(0, min(float(clip_seconds), duration))  # failures reported
        decoded = clip is not None and clip.get("video") is not None
    finally:
        video.close()
    if decoded and not quick:
        found += _full_decode(path)
    return found


def check_kinetics(data_path: str, *, num_frames: int = 16, sampling_rate: int = 4,
                   target_fps: float = 30, video_path_prefix: Optional[str] = None,
                   num_classes: Optional[int] = None, quick: bool = False, workers: int = 0,
                   progress: Optional[bool] = None,
                   name: Optional[str] = None) -> PreflightReport:
    """The problems of a Kinetics list file (``<path> <label>`` lines) or class-folder tree and
    its videos, at the loaders' sampling (a clip is ``num_frames * sampling_rate`` frames at
    ``target_fps``): list lines that cannot be used (malformed, label outside
    ``[0, num_classes)``), videos that cannot be opened or decoded (errors), videos too short
    for one clip (warnings). Raises (one line) when the list is missing or has no usable line."""
    videos = read_video_list(data_path, video_path_prefix, num_classes)
    settings = {"data_path": str(data_path), "video_path_prefix": videos._path_prefix,
                "num_frames": int(num_frames), "sampling_rate": int(sampling_rate),
                "target_fps": float(target_fps), "num_classes": num_classes, "quick": bool(quick)}
    report = PreflightReport(name or f"kinetics: {data_path}", "kinetics", settings)
    report.entries = videos.num_entries
    report.extend(Finding(r.path, r.reason, r.detail, ERROR) for r in videos.rejected)
    paths = list(dict.fromkeys(videos[i][0] for i in range(len(videos))))
    check = functools.partial(check_video_file,
                              clip_seconds=float(clip_duration(num_frames, sampling_rate,
                                                               target_fps)),
                              min_duration=min_video_duration(num_frames, sampling_rate,
                                                              target_fps),
                              quick=bool(quick))
    report.extend(check_in_parallel(check, paths, workers, "videos", progress, chunk=4))
    return report
