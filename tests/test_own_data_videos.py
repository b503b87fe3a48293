"""A user's own Kinetics-format videos: real-codec files written here with PyAV (h264, mpeg4,
mjpeg, vp8; odd sizes, variable frame rate, an audio track) load, a video shorter than one clip
is used with repeated frames (as in SlowFast and pytorchvideo), and every broken entry (missing,
empty, text, truncated, audio-only, frames that do not decode, malformed list lines, labels out
of range) is skipped with one warning naming it and its reason, counted once per
distinct entry, in the loaders and in tools/run_video.py."""
import logging
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from _media import FPS, GOOD_FRAMES, SHORT, write_audio_only, write_video  # noqa: F401
from _media import GOOD_VIDEOS as GOOD
from _media import need_codec as _need_codec
from _media import write_bad_videos as _write_bad
from _runs import assert_one_error_line

av = pytest.importorskip("av")

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "run_video.py"

# The sampling of the demo config (configs/Kinetics/rev_mvit_test_synthetic.py): 8 frames, 2
# apart at 16 fps; a clip spans (8 - 1) * 2 / 16 = 0.875 s. A shorter video is used anyway: its
# clip starts at 0 and repeats frames.
SAMPLING = dict(num_frames=8, sampling_rate=2, target_fps=16)


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """Good videos of every codec this av build writes, the broken files, and lists of them."""
    d = tmp_path_factory.mktemp("own_videos")
    good, missing_codecs = [], []
    for name, (make, codec) in GOOD.items():
        try:
            av.codec.Codec(codec, "w")
        except Exception:  # noqa: BLE001
            missing_codecs.append(codec)
            continue
        make(d / name)
        good.append(name)
    bad = _write_bad(d)
    write_video(d / SHORT, "mpeg4", frames=2)
    usable = good + [SHORT]
    lines = [f"{name} {i % 4}" for i, name in enumerate(usable)]
    lines += [f"{name} {i % 4}" for i, name in enumerate(bad)]
    malformed = {"only_a_path.mp4": "malformed list line", "mpeg4_33x17.mp4 cat":
                 "malformed list line", "mpeg4_33x17.mp4 -1": "label out of range",
                 "mpeg4_33x17.mp4 7": "label out of range"}  # 4 classes
    first_bad_line = len(lines) + 1
    lines += list(malformed)
    (d / "mixed.csv").write_text("\n".join(lines) + "\n\n")  # a blank line is not an entry
    (d / "good.csv").write_text("".join(f"{name} {i % 4}\n" for i, name in enumerate(good)))
    expected = dict(bad)
    for n, reason in enumerate(malformed.values(), first_bad_line):
        expected[f"mixed.csv:{n}"] = reason
    return dict(dir=d, good=good, usable=usable, bad=bad, expected=expected,
                missing_codecs=missing_codecs)


def _names(entries):
    """{entry: reason} with the file names only (entries are full paths, or list:line)."""
    return {Path(k).name: v for k, v in entries.items()}


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
            and r.getMessage().startswith("skipping")]


def _warned_once_each(caplog, expected):
    msgs = _warnings(caplog)
    for name, reason in expected.items():
        hits = [m for m in msgs if re.search(rf"[ /]{re.escape(name)}: ", m)]
        assert len(hits) == 1, (name, hits, msgs)
        assert f": {reason}" in hits[0], hits[0]
    assert len(msgs) == len(expected), msgs


def _test_loader(path, **kw):
    from revvit_video.data import build_kinetics_test_loader

    args = dict(SAMPLING, num_clips=2, short_side=16, crop_size=16, batch_size=4, num_workers=0,
                num_classes=4)
    args.update(kw)
    return build_kinetics_test_loader(str(path), **args)


def _views(loader):
    views = {}
    for batch in loader:
        if batch["video"] is None:
            continue
        assert batch["video"].shape[1:] == (3, 8, 16, 16)
        for v in batch["video_index"].tolist():
            views[v] = views.get(v, 0) + 1
    return views


# ---------------------------------------------------------------------------------------------
# Good files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", sorted({c for _, c in GOOD.values()}))
def test_codec_available_or_skipped_by_name(own, codec):
    if codec in own["missing_codecs"]:
        _need_codec(codec)  # skips, naming the codec
    assert any(GOOD[n][1] == codec for n in own["good"])


def test_every_good_video_loads_with_every_view(own, caplog):
    loader = _test_loader(own["dir"] / "good.csv")
    views = _views(loader)
    assert views == {i: 2 for i in range(len(own["good"]))}
    assert loader.skipped_entries() == {} and not _warnings(caplog)


def test_video_shorter_than_a_clip_is_used_with_repeated_frames(own, tmp_path, caplog):
    """2 frames (0.125 s) where a clip spans 0.875 s: the train and the test loader both make
    clips of the full shape from it (frames repeated, as SlowFast's decoder and pytorchvideo
    do), and nothing is skipped."""
    from revvit_video.data import build_kinetics_train_loader

    caplog.set_level(logging.WARNING)
    lst = tmp_path / "short.csv"
    lst.write_text(f"{own['dir'] / SHORT} 3\n")
    loader = _test_loader(lst)
    batches = [b for b in loader if b["video"] is not None]
    assert _views(loader) == {0: 2}
    clip = batches[0]["video"][0]
    assert clip.shape == (3, 8, 16, 16)
    # The two source frames differ (their red channel); 8 frames from 2 repeat them.
    distinct = {tuple(clip[:, t].flatten().tolist()) for t in range(8)}
    assert 1 < len(distinct) <= 2
    assert loader.skipped_entries() == {}
    train = build_kinetics_train_loader(str(lst), **SAMPLING, crop_size=16, total_batch_size=1,
                                        num_workers=0, seed=0, num_classes=4)
    batch = next(iter(train))
    assert batch["video"].shape == (1, 3, 8, 16, 16) and batch["label"].tolist() == [3]
    assert train.skipped.entries() == {} and not _warnings(caplog)


# ---------------------------------------------------------------------------------------------
# Broken entries: one warning each, distinct counts per reason
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1])
def test_test_loader_skips_each_bad_entry_once_with_its_reason(own, caplog, workers):
    from revvit_video.data import skip_counts

    from revvit_video import data as data_mod

    data_mod._WARNED.clear()  # warnings are once per process: each case starts afresh
    caplog.set_level(logging.WARNING)
    loader = _test_loader(own["dir"] / "mixed.csv", num_workers=workers)
    assert loader.num_videos == len(own["usable"]) + len(own["expected"])  # every entry
    for _ in range(2):  # a second pass: same counts, no second warning
        views = _views(loader)
        assert sorted(views) == list(range(len(own["usable"])))  # the short video too
        assert set(views.values()) == {2}
        assert _names(loader.skipped_entries()) == own["expected"]
    _warned_once_each(caplog, own["expected"])
    counts = skip_counts(loader.skipped_entries())
    assert counts == {"unreadable": 2, "no frame decoded": 1, "empty file": 1,
                      "no video stream": 2, "file not found": 1,
                      "malformed list line": 2, "label out of range": 2}


def test_train_loader_counts_distinct_files_over_epochs(own, caplog):
    from revvit_video import data as data_mod
    from revvit_video.data import build_kinetics_train_loader

    data_mod._WARNED.clear()
    caplog.set_level(logging.WARNING)
    loader = build_kinetics_train_loader(str(own["dir"] / "mixed.csv"), **SAMPLING, crop_size=16,
                                         total_batch_size=2, num_workers=0, seed=1,
                                         num_classes=4)
    stream = iter(loader)
    ipe = loader.iters_per_epoch
    good = set(range(len(own["usable"])))
    for _ in range(3 * ipe):  # three epochs: the sampler meets every bad file three times
        batch = next(stream)
        assert set(batch["video_index"].tolist()) <= good
        assert batch["video"].shape == (2, 3, 8, 16, 16)
    assert loader.epoch == 2
    assert _names(loader.skipped.entries()) == own["expected"]
    assert loader.skipped.events > len(loader.skipped.paths)  # met again, counted once
    _warned_once_each(caplog, own["expected"])


def test_nothing_usable_is_one_line_error(own, tmp_path):
    from revvit_video.data import (NoReadableVideoError, build_kinetics_train_loader,
                                   read_video_list)

    bad = tmp_path / "bad.csv"
    bad.write_text("".join(f"{own['dir'] / n} 0\n" for n in own["bad"]))
    loader = build_kinetics_train_loader(str(bad), **SAMPLING, crop_size=16, total_batch_size=2,
                                         num_workers=0)
    with pytest.raises(NoReadableVideoError) as e:
        next(iter(loader))
    assert "\n" not in str(e.value) and f"{len(own['bad'])} skipped" in str(e.value)
    assert "2 no video stream" in str(e.value)

    lines = tmp_path / "lines.csv"
    lines.write_text("a.mp4\nb.mp4 cat\n")
    with pytest.raises(ValueError, match=r"no usable entry .*all 2 rejected") as e:
        read_video_list(str(lines))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="label out of range"):
        read_video_list(str(bad), num_classes=0)


def test_list_written_on_windows_and_a_folder_entry(own, tmp_path):
    """A byte-order mark and CRLF line ends (Notepad, Excel) are not part of the paths; a
    folder in the list (pytorchvideo would read it as frame images) is skipped."""
    from revvit_video.data import read_video_list

    good = own["good"][0]
    (tmp_path / "frames").mkdir()
    lst = tmp_path / "windows.csv"
    lst.write_bytes(("\ufeff" + f"{own['dir'] / good} 0\r\n{tmp_path / 'frames'} 1\r\n")
                    .encode("utf-8"))
    paths = read_video_list(str(lst))
    assert paths[0][0] == str(own["dir"] / good) and not paths.rejected
    loader = _test_loader(lst)
    assert _views(loader) == {0: 2}
    assert _names(loader.skipped_entries()) == {"frames": "unreadable"}


def test_class_folder_tree(own, tmp_path, caplog):
    from revvit_video import data as data_mod
    from revvit_video.data import read_video_list

    data_mod._WARNED.clear()
    caplog.set_level(logging.WARNING)
    root = tmp_path / "tree"
    files = {"abseil/a.mp4": "mpeg4_33x17.mp4", "abseil/sub/b.avi": "mjpeg_33x17.avi",
             "bowling/c.webm": "vp8_32x24.webm", "bowling/d.mp4": "audio_only.mp4",
             "bowling/e.mp4": "zero.mp4"}
    for dest, src in files.items():
        if src not in own["good"] and src not in own["bad"]:
            continue  # a codec this av build lacks
        (root / dest).parent.mkdir(parents=True, exist_ok=True)
        (root / dest).write_bytes((own["dir"] / src).read_bytes())
    (root / "bowling" / "notes.txt").write_text("not a video")
    (root / "empty_class").mkdir()
    paths = read_video_list(str(root))
    got = {str(Path(p).relative_to(root)): info["label"] for p, info in
           (paths[i] for i in range(len(paths)))}
    want = {k: (0 if k.startswith("abseil") else 1) for k in files if (root / k).exists()}
    assert got == want and not paths.rejected
    assert len(read_video_list(str(root), num_classes=1).rejected) == len(
        [k for k in want if k.startswith("bowling")])
    loader = _test_loader(root, num_classes=None)
    views = _views(loader)
    assert len(views) == len([k for k in want if Path(k).stem in "abc"])  # a, b, c decode
    assert _names(loader.skipped_entries()) == {"d.mp4": "no video stream",
                                                "e.mp4": "empty file"}


# ---------------------------------------------------------------------------------------------
# tools/run_video.py: training and evaluation on the mixed list end with exit 0 and the counts
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_video_trains_and_evaluates_on_own_list(own, tmp_path):
    lst = own["dir"] / "mixed.csv"
    out = tmp_path / "out"
    # One epoch: floor(usable entries / 2) iterations of 2 clips; the epoch's order of videos
    # restarts until it has them, so training meets every broken file at least once.
    epoch = (len(own["usable"]) + len(own["bad"])) // 2
    args = [f"dataloader.train.data_path={lst}", f"dataloader.test.data_path={lst}",
            f"train.output_dir={out}", f"train.max_iter={epoch}", "train.log_period=1",
            "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
            "dataloader.test.num_workers=0", "dataloader.test.num_clips=1",
            "dataloader.test.batch_size=4", "train.device=cpu"]
    env = dict(os.environ, REVVIT_DATASETS=str(tmp_path / "unused"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    entries = len(own["usable"]) + len(own["expected"])
    bad = len(own["expected"])
    why = ("2 label out of range, 2 malformed list line, 2 no video stream, 2 unreadable, "
           "1 empty file, 1 file not found, 1 no frame decoded")
    assert f"Training skipped {bad} of {entries} list entries ({why})\n" in proc.stdout, \
        log[-4000:]
    assert f"; {bad} skipped ({why}), 0 with fewer views" in proc.stdout, log[-4000:]
    last = proc.stdout.rstrip().splitlines()[-1]
    assert re.match(rf"^\* Top-1 [\d.]+ Top-5 [\d.]+ videos {len(own['usable'])} skipped {bad} ",
                    last), last
    for name in own["bad"]:  # one warning per bad file in the test pass
        assert len(re.findall(rf"skipping test video \S*/{re.escape(name)}: ", proc.stdout)) == 1


@pytest.mark.slow
def test_run_video_nothing_usable_is_one_error_line(own, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("".join(f"{own['dir'] / n} 0\n" for n in own["bad"]))
    env = dict(os.environ, REVVIT_DATASETS=str(tmp_path / "unused"), OMP_NUM_THREADS="1")
    common = [f"dataloader.test.data_path={bad}", f"train.output_dir={tmp_path / 'out'}",
              "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
              "dataloader.train.total_batch_size=2", "train.device=cpu"]
    n = len(own["bad"])
    for extra, needle in (([f"dataloader.train.data_path={bad}"],
                           f"error: no training video could be used in a whole pass over {n} "
                           f"list entries ({n} skipped: 2 no video stream, 2 unreadable,"),
                          (["--eval-only"], f"could be used ({n} skipped: 2 no video stream")):
        proc = subprocess.run([sys.executable, str(TOOL), *extra, *common], capture_output=True,
                              text=True, env=env, cwd=str(ROOT), timeout=600)
        assert_one_error_line(proc, needle)
