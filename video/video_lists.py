"""Kinetics-format video lists and class-folder trees, read into pytorchvideo's
``LabeledVideoPaths`` with the entries that cannot be used set aside; and the reasons an entry
(a list line, a video, a clip) is skipped, shared by the datasets (:mod:`.datasets`) and the
loaders' reports (:mod:`.data`).
"""
import os
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from pytorchvideo.data.labeled_video_paths import LabeledVideoPaths

__all__ = ["SKIP_REASONS", "VIDEO_EXTENSIONS", "SkipRecord", "VideoList", "read_video_list"]

# Why an entry was skipped: the keys of the counts that the tools report.
FILE_NOT_FOUND = "file not found"
EMPTY_FILE = "empty file"
UNREADABLE = "unreadable"  # not a media file, or a truncated or corrupt container
NO_VIDEO_STREAM = "no video stream"  # e.g. audio only
TOO_SHORT = "too short"  # shorter than one clip at the sampling
NO_FRAME = "no frame decoded"
DECODE_FAILED = "decoding failed"
TRANSFORM_FAILED = "transform failed"
MALFORMED_LINE = "malformed list line"
BAD_LABEL = "label out of range"
SKIP_REASONS = (FILE_NOT_FOUND, EMPTY_FILE, UNREADABLE, NO_VIDEO_STREAM, TOO_SHORT, NO_FRAME,
                DECODE_FAILED, TRANSFORM_FAILED, MALFORMED_LINE, BAD_LABEL)

# Files of a class-folder tree taken as videos (pytorchvideo's own scan takes .mp4 and .avi only;
# YouTube downloaders write .webm and .mkv too).
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv",
                    ".flv", ".wmv", ".3gp")


class SkipRecord(NamedTuple):
    """An entry (a video, one of its clips, or a list line) that could not be used, and why.

    ``path`` is the video file, or ``<list file>:<line number>`` for a rejected list line;
    ``reason`` is one of :data:`SKIP_REASONS`; ``detail`` is the error or the numbers.
    """

    path: str
    reason: str
    detail: str = ""


class VideoList(LabeledVideoPaths):
    """pytorchvideo's ``LabeledVideoPaths`` of the usable entries of a list (or class-folder
    tree), with the entries that were left out.

    Attributes:
        rejected: :class:`SkipRecord` s of the list lines that cannot be used (path
            ``<list file>:<line number>``; reasons ``malformed list line``, ``label out of
            range``).
        source: the list file or folder.
    """

    def __init__(self, paths_and_labels, path_prefix: str = "",
                 rejected: Sequence[SkipRecord] = (), source: str = ""):
        super().__init__(list(paths_and_labels), path_prefix)
        self.rejected = list(rejected)
        self.source = str(source)

    @property
    def num_entries(self) -> int:
        """Usable and rejected entries."""
        return len(self) + len(self.rejected)


def _label_problem(label: int, num_classes: Optional[int]) -> Optional[str]:
    if label < 0 or (num_classes is not None and label >= int(num_classes)):
        bound = f"[0, {int(num_classes)})" if num_classes is not None else "labels >= 0"
        return f"label {label} not in {bound}"
    return None


def _read_list_file(path: Path, num_classes: Optional[int]):
    good, rejected = [], []
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the path
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line]
    if not lines:
        raise ValueError(f"video list {path} is empty")
    for n, line in lines:
        where = f"{path}:{n}"
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            rejected.append(SkipRecord(where, MALFORMED_LINE,
                                       f"expected '<path> <integer label>', got {line!r}"))
            continue
        try:
            label = int(parts[1])
        except ValueError:
            rejected.append(SkipRecord(where, MALFORMED_LINE,
                                       f"label {parts[1]!r} is not an integer in {line!r}"))
            continue
        problem = _label_problem(label, num_classes)
        if problem:
            rejected.append(SkipRecord(where, BAD_LABEL, f"{problem} in {line!r}"))
            continue
        good.append((parts[0], label))
    return good, rejected


def _read_class_folders(path: Path, num_classes: Optional[int]):
    """``<root>/<class>/...<video>``: pytorchvideo's layout and order (classes sorted, then
    ``os.walk`` order), any of :data:`VIDEO_EXTENSIONS`."""
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    good, rejected = [], []
    for label, name in enumerate(classes):
        problem = _label_problem(label, num_classes)
        for root, _, files in sorted(os.walk(path / name, followlinks=True)):
            for f in sorted(files):
                if not f.lower().endswith(VIDEO_EXTENSIONS):
                    continue
                video = os.path.join(root, f)
                if problem:
                    rejected.append(SkipRecord(video, BAD_LABEL,
                                               f"class folder {name!r} is class {label}: "
                                               f"{problem}"))
                else:
                    good.append((video, label))
    if not good and not rejected:
        raise ValueError(f"no videos in {path}: expected <root>/<class>/<video> with one of "
                         f"{', '.join(VIDEO_EXTENSIONS)}")
    return good, rejected


def read_video_list(data_path: str, video_path_prefix: Optional[str] = None,
                    num_classes: Optional[int] = None) -> VideoList:
    """Read a Kinetics list file (``<path> <label>`` lines) or a ``<root>/<class>/<video>``
    directory.

    A line that cannot be used (not two fields, a label that is not an integer, a label outside
    ``[0, num_classes)``, or negative when `num_classes` is not given) is left out and recorded
    in ``rejected``; blank lines are ignored.

    Raises:
        FileNotFoundError: `data_path` does not exist.
        ValueError: the list is empty, or none of its entries is usable (one line naming the
            first problem).
    """
    path = Path(os.path.expanduser(str(data_path)))
    if not path.exists():
        raise FileNotFoundError(f"video list not found: {path}")
    if path.is_file():
        good, rejected = _read_list_file(path, num_classes)
        if video_path_prefix is None:
            video_path_prefix = str(path.parent)
    else:
        good, rejected = _read_class_folders(path, num_classes)
    if not good:
        first = rejected[0]
        raise ValueError(f"no usable entry in {path}: all {len(rejected)} rejected, e.g. "
                         f"{first.path}: {first.reason}: {first.detail}")
    return VideoList(good, video_path_prefix or "", rejected, str(path))
