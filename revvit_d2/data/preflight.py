"""Preflight checks of a dataset before a long run: every entry read as training will read it,
in worker processes, and every problem reported at once (``tools/check_dataset.py``).

* :class:`Finding`: one problem of one entry (a file, or ``<json>:annotation 12``,
  ``<list>:3``), its reason and details, and its severity: ``error`` (training skips the entry)
  or ``warning`` (training uses it, but it is probably not what you meant).
* :class:`PreflightReport`: the findings of one dataset, their counts per reason (of distinct
  entries), a terminal table, a JSON report and the one-line summary.
* :func:`check_in_parallel`: runs a per-entry check over worker processes with a progress bar.
* :func:`check_imagefolder`: an ImageNet-layout folder, each image decoded as
  :class:`~revvit_d2.data.imagefolder.SafeImageFolder` decodes it.

The COCO check (:mod:`revvit_d2.d2.preflight`) and the Kinetics check
(:mod:`revvit_video.preflight`) are built on these.
"""
import concurrent.futures as futures
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from revvit_d2.data.images import READ_ERRORS, SIZE_DIFFERS, read_failure_reason, size_mismatch
from revvit_d2.data.imagefolder import _check_imagefolder, _pil_rgb_loader
from revvit_d2.utils.errors import one_line
from revvit_d2.utils.io import atomic_write

__all__ = ["ERROR", "WARNING", "Finding", "PreflightReport", "check_in_parallel",
           "check_imagefolder", "check_image_file", "size_mismatch", "summary_line",
           "write_json_report", "default_workers", "SIZE_DIFFERS", "EMPTY_CLASS"]

ERROR = "error"  # training skips the entry
WARNING = "warning"  # training uses the entry; look at it anyway
EMPTY_CLASS = "class folder without images"


class Finding(NamedTuple):
    """One problem of one entry.

    ``where``: the file, or ``<json>:annotation <id>`` / ``<list>:<line>`` for a part of an
    index file; ``reason``: a short label, counted; ``detail``: the numbers or the error;
    ``severity``: :data:`ERROR` or :data:`WARNING`.
    """

    where: str
    reason: str
    detail: str = ""
    severity: str = ERROR


def check_image_file(path: str, declared: Optional[Tuple[int, int]] = None,
                     reader: Callable[[str], Any] = _pil_rgb_loader) -> List[Finding]:
    """The problems of one image file read by `reader` (returns a PIL image or an ``HxWxC``
    array): unreadable (``missing``, ``not a file``, ``empty file``, ``unreadable``), and, when
    `declared` ``(width, height)`` is given, ``size differs from the annotation``."""
    try:
        image = reader(path)
    except READ_ERRORS as e:
        return [Finding(path, read_failure_reason(path, e), one_line(e))]
    if declared is None:
        return []
    actual = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
    text = size_mismatch(declared, actual)
    return [] if text is None else [Finding(path, SIZE_DIFFERS, text)]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
class PreflightReport:
    """The findings of one dataset (or split).

    Args:
        name: what was checked, e.g. ``train: /data/coco/train.json``.
        kind: ``coco``, ``kinetics`` or ``imagefolder``.
        settings: what the check used (paths, sampling), written into the JSON report.
    """

    def __init__(self, name: str, kind: str, settings: Optional[Dict[str, Any]] = None):
        self.name, self.kind = str(name), str(kind)
        self.settings = dict(settings or {})
        self.entries = 0  # entries checked (images, videos, list lines)
        self.findings: List[Finding] = []

    def extend(self, findings: Iterable[Finding]):
        self.findings.extend(findings)

    def counts(self, severity: Optional[str] = None,
               ignore: Sequence[str] = ()) -> Dict[str, int]:
        """``{reason: distinct entries}``, most frequent first; only `severity` when given,
        without the reasons in `ignore`."""
        seen = {}
        for f in self.findings:
            if (severity is None or f.severity == severity) and f.reason not in ignore:
                seen.setdefault((f.reason, f.where), None)
        counts = Counter(reason for reason, _ in seen)
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def problems(self, ignore: Sequence[str] = ()) -> int:
        """Distinct (entry, reason) findings that count against the dataset."""
        return sum(self.counts(ignore=ignore).values())

    def table(self, max_rows: Optional[int] = 50) -> str:
        """The findings as a fixed-width table, errors first, at most `max_rows` rows (then a
        line saying how many more)."""
        rows = sorted(set(self.findings), key=lambda f: (f.severity != ERROR, f.reason, f.where))
        lines = [f"{self.name}: {self.entries} entries checked, "
                 f"{len({f.where for f in rows})} with problems"]
        if not rows:
            return lines[0]
        shown = rows if max_rows is None else rows[:max_rows]
        width = min(60, max(len(_tail(f.where)) for f in shown))
        rwidth = max(len(f.reason) for f in shown)
        lines.append(f"  {'severity':<8}  {'reason':<{rwidth}}  {'entry':<{width}}  detail")
        for f in shown:
            lines.append(f"  {f.severity:<8}  {f.reason:<{rwidth}}  {_tail(f.where):<{width}}  "
                         f"{f.detail}".rstrip())
        if len(rows) > len(shown):
            lines.append(f"  ... {len(rows) - len(shown)} more in the JSON report")
        return "\n".join(lines)

    def to_dict(self, ignore: Sequence[str] = ()) -> Dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "settings": self.settings,
            "entries": self.entries,
            "errors": self.counts(ERROR, ignore), "warnings": self.counts(WARNING, ignore),
            "ignored": sorted(set(ignore)),
            "findings": [f._asdict() for f in self.findings],
        }


def _tail(where: str, width: int = 60) -> str:
    return where if len(where) <= width else "..." + where[-(width - 3):]


def _describe(counts: Dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.items())


def summary_line(reports: Sequence[PreflightReport], ignore: Sequence[str] = ()) -> str:
    """``check_dataset: 1200 entries checked: 5 errors (3 unreadable, ...), 1 warning (...)``,
    or ``...: no problems``; the last line the tool prints."""
    entries = sum(r.entries for r in reports)
    errors, warnings = Counter(), Counter()
    for r in reports:
        errors.update(r.counts(ERROR, ignore))
        warnings.update(r.counts(WARNING, ignore))
    parts = []
    for label, counts in (("error", errors), ("warning", warnings)):
        n = sum(counts.values())
        if n:
            ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
            parts.append(f"{n} {label}{'s' if n != 1 else ''} ({_describe(ordered)})")
    ignored = sum(sum(r.counts(ignore=()).get(i, 0) for i in ignore) for r in reports)
    tail = f"; {ignored} ignored ({', '.join(sorted(set(ignore)))})" if ignored else ""
    return (f"check_dataset: {entries} entries checked: "
            f"{', '.join(parts) if parts else 'no problems'}{tail}")


def write_json_report(path: str, reports: Sequence[PreflightReport],
                      ignore: Sequence[str] = ()) -> None:
    """All reports and the summary as one JSON file, written atomically."""
    text = json.dumps({"summary": summary_line(reports, ignore),
                       "datasets": [r.to_dict(ignore) for r in reports]}, indent=1)
    with atomic_write(path, "w") as f:
        f.write(text + "\n")


# --------------------------------------------------------------------------------------------
# Running checks in worker processes
# --------------------------------------------------------------------------------------------
def _run_chunk(check: Callable[[Any], List[Finding]], items: Sequence[Any]) -> List[Finding]:
    out = []
    for item in items:
        out.extend(check(item))
    return out


def check_in_parallel(check: Callable[[Any], List[Finding]], items: Sequence[Any],
                      workers: int = 0, desc: str = "checking", progress: Optional[bool] = None,
                      chunk: int = 16) -> List[Finding]:
    """``check(item)`` for every item, in `workers` processes (0: in this process), with a
    progress bar on stderr (default: when stderr is a terminal). `check` must be a
    module-level function (or a ``functools.partial`` of one) so that it can be pickled.
    Findings come back in the order of `items`."""
    items = list(items)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = tqdm(total=len(items), desc=desc, unit="entry", disable=not show, file=sys.stderr,
               dynamic_ncols=True)
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    results: List[Optional[List[Finding]]] = [None] * len(chunks)
    try:
        if workers <= 0:
            for i, part in enumerate(chunks):
                results[i] = _run_chunk(check, part)
                bar.update(len(part))
        else:
            with futures.ProcessPoolExecutor(max_workers=int(workers)) as pool:
                pending = {pool.submit(_run_chunk, check, part): i for i, part in enumerate(chunks)}
                for done in futures.as_completed(pending):
                    i = pending[done]
                    results[i] = done.result()
                    bar.update(len(chunks[i]))
    finally:
        bar.close()
    return [f for part in results for f in part]


def default_workers() -> int:
    """Worker processes for a check: the CPUs this process may use, at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(16, n))


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------
def check_imagefolder(root: str, workers: int = 0, progress: Optional[bool] = None,
                      name: Optional[str] = None) -> PreflightReport:
    """Every image of an ImageNet-layout folder (``<root>/<class>/<image>``, torchvision's
    extensions), decoded as :class:`~revvit_d2.data.imagefolder.SafeImageFolder` does; class
    folders without any image are warnings (their class still gets a label). A missing root or
    one without class folders raises (one line)."""
    root_path = Path(os.path.expanduser(str(root)))
    classes = _check_imagefolder(root_path)
    files, findings = [], []
    for c in classes:
        found = []
        for dirpath, _, names in sorted(os.walk(root_path / c, followlinks=True)):
            found += [os.path.join(dirpath, n) for n in sorted(names)
                      if n.lower().endswith(IMG_EXTENSIONS)]
        if not found:
            findings.append(Finding(str(root_path / c), EMPTY_CLASS,
                                    f"no file with one of {', '.join(IMG_EXTENSIONS)}", WARNING))
        files += found
    report = PreflightReport(name or f"imagefolder: {root_path}", "imagefolder",
                             {"root": str(root_path), "classes": len(classes)})
    report.entries = len(files)
    report.extend(findings)
    report.extend(check_in_parallel(check_image_file, files, workers, "images", progress))
    return report
