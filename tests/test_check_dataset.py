"""tools/check_dataset.py and the preflight checks behind it, on files made here: the images of
test_own_data_images.py (every PIL mode people have, broken files, EXIF rotation, a resized
image) in a COCO json with broken entries and in an ImageFolder, and the real-codec videos of
test_own_data_videos.py plus two that break half-way. Every finding is compared by file and
reason; the tool's exit status, last line and JSON report are checked through a subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _media import (BAD_IMAGES, GOOD_IMAGES, GOOD_VIDEOS, IMAGEFOLDER_BAD, NO_ANNOTATION,
                    SHORT, make_imagefolder, make_images, write_bad_videos, write_coco,
                    write_coco_config, write_video)

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "check_dataset.py"
SAMPLING = dict(num_frames=8, sampling_rate=2, target_fps=16)  # the demo config's

av = pytest.importorskip("av")


def _by_name(report, severity=None):
    """{file name or list:line: reason} of a report's findings."""
    return {Path(f.where).name: f.reason for f in report.findings
            if severity is None or f.severity == severity}


def _tool(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               REVVIT_DATASETS=str(Path(cwd) / "datasets"))
    proc = subprocess.run([sys.executable, str(TOOL), "--no-progress", *map(str, args)],
                          cwd=str(cwd), env=env, capture_output=True, text=True, timeout=600)
    return proc, proc.stdout.strip().splitlines()


# ---------------------------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = make_imagefolder(tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("imagefolder"))
    (root / "class_2_empty").mkdir()
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_imagefolder_every_problem_once(folder, workers):
    from revvit_d2.data.preflight import check_imagefolder

    report = check_imagefolder(folder, workers=workers, progress=False)
    assert report.entries == len(GOOD_IMAGES) + len(IMAGEFOLDER_BAD)
    assert _by_name(report, "error") == IMAGEFOLDER_BAD
    assert _by_name(report, "warning") == {"class_2_empty": "class folder without images"}
    assert report.counts("error") == {"unreadable": 2, "empty file": 1}


def test_tool_imagefolder_exit_status_summary_and_json(folder, tmp_path):
    proc, lines = _tool("--imagefolder", folder, "--workers", 2, "--report", "r.json",
                        cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert lines[-1] == ("check_dataset: 11 entries checked: 3 errors (2 unreadable, 1 empty "
                         "file), 1 warning (1 class folder without images)")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"] == lines[-1]
    (data,) = report["datasets"]
    assert data["kind"] == "imagefolder" and data["entries"] == 11
    assert data["errors"] == {"unreadable": 2, "empty file": 1}
    assert {Path(f["where"]).name: f["reason"] for f in data["findings"]
            if f["severity"] == "error"} == IMAGEFOLDER_BAD
    assert "Traceback" not in proc.stderr

    clean = tmp_path / "clean"
    (clean / "a").mkdir(parents=True)
    (clean / "a" / "rgb.png").write_bytes((folder / "class_0" / "rgb.png").read_bytes())
    proc, lines = _tool("--imagefolder", clean, "--report", "", cwd=tmp_path)
    assert proc.returncode == 0 and lines[-1] == "check_dataset: 1 entries checked: no problems"

    proc, _ = _tool("--imagefolder", tmp_path / "nowhere", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: imagefolder: ")
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# COCO json + images
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    pytest.importorskip("detectron2")
    d = tmp_path_factory.mktemp("coco")
    make_images(d)
    json_file = write_coco(d, list(GOOD_IMAGES) + list(BAD_IMAGES) + [NO_ANNOTATION])
    data = json.loads(json_file.read_text())
    ann = data["annotations"]
    extra = dict(ann[0], id=9001, category_id=7)  # not in categories
    nobox = dict(ann[1], id=9002)
    nobox.pop("bbox")
    dup = dict(ann[2])  # same id as ann[2]
    orphan = dict(ann[3], id=9003, image_id=4242)
    data["annotations"] += [extra, nobox, dup, orphan]
    json_file.write_text(json.dumps(data))
    return {"root": d, "json": json_file, "dup_id": ann[2]["id"]}


def test_coco_json_and_images_every_problem(coco):
    from revvit_d2.d2.preflight import check_coco

    report = check_coco(str(coco["json"]), str(coco["root"]), workers=2, progress=False)
    files = {Path(f.where).name: f.reason for f in report.findings
             if ":" not in Path(f.where).name}
    assert files == BAD_IMAGES
    json_findings = {(f.where.rsplit(":", 1)[1], f.reason, f.severity) for f in report.findings
                     if ":" in Path(f.where).name}
    assert json_findings == {
        ("annotation 9001", "unknown category id", "error"),
        ("annotation 9002", "bad box", "error"),
        ("annotation 9003", "unknown image id", "error"),
        (f"annotation {coco['dup_id']}", "duplicate annotation id", "warning"),
        (f"image {len(GOOD_IMAGES) + len(BAD_IMAGES) + 1}", "no annotation", "warning"),
    }
    mismatch = [f for f in report.findings if Path(f.where).name == "mismatch.png"][0]
    assert "declared 128x96 (width x height), actual 64x48" in mismatch.detail
    swapped = [f for f in report.findings if Path(f.where).name == "exif6_raw.jpg"][0]
    assert "width and height swapped" in swapped.detail


def test_tool_coco_from_config(coco, tmp_path):
    config = write_coco_config(coco["root"], coco["json"].name, "own_check")
    proc, lines = _tool("--config-file", config, "--splits", "train", "--workers", 2,
                        "--ignore", "no annotation", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert lines[-1] == (
        "check_dataset: 35 entries checked: 10 errors (2 size differs from the annotation, "
        "2 unreadable, 1 bad box, 1 empty file, 1 missing, 1 not a file, 1 unknown category "
        "id, 1 unknown image id), 1 warning (1 duplicate annotation id); 1 ignored "
        "(no annotation)"), lines[-1]
    table = "\n".join(lines)
    assert "train own_check:" in table and "mismatch.png" in table
    report = json.loads((tmp_path / "check_dataset_report.json").read_text())
    assert report["datasets"][0]["settings"]["json_file"] == str(coco["json"])


# ---------------------------------------------------------------------------------------------
# Kinetics list + videos
# ---------------------------------------------------------------------------------------------
def _damage_middle(path: Path, fill: int, span: int) -> Path:
    """Overwrite `span` bytes at 60 % of the file: the container opens and the first clip
    decodes; decoding stops with an error further on."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * 0.6)
    data[start:start + span] = bytes([fill]) * span
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    good = []
    for name, (make, codec) in GOOD_VIDEOS.items():
        try:
            av.codec.Codec(codec, "w")
        except Exception:  # noqa: BLE001 - this av build cannot write it
            continue
        make(d / name)
        good.append(name)
    bad = write_bad_videos(d)
    write_video(d / SHORT, "mpeg4", frames=2)
    _damage_middle(write_video(d / "mid_damaged.avi", "mjpeg", frames=64, pix_fmt="yuvj420p"),
                   0, 4000)
    names = good + list(bad) + [SHORT, "mid_damaged.avi"]
    lines = [f"{n} {i % 4}" for i, n in enumerate(names)] + ["header_line", "mjpeg_33x17.avi 9"]
    (d / "list.csv").write_text("\n".join(lines) + "\n")
    errors = dict(bad)
    errors.update({"list.csv:%d" % (len(names) + 1): "malformed list line",
                   "list.csv:%d" % (len(names) + 2): "label out of range"})
    return {"dir": d, "errors": errors, "entries": len(lines),
            "short": [SHORT]}


def test_kinetics_every_problem_once(videos):
    from revvit_video.preflight import check_kinetics

    quick = check_kinetics(str(videos["dir"] / "list.csv"), **SAMPLING, num_classes=4,
                           quick=True, workers=2, progress=False)
    assert quick.entries == videos["entries"]
    assert _by_name(quick, "error") == videos["errors"]
    assert _by_name(quick, "warning") == {n: "too short" for n in videos["short"]}
    # The full decode finds the video that breaks after its first clip.
    full = check_kinetics(str(videos["dir"] / "list.csv"), **SAMPLING, num_classes=4,
                          workers=2, progress=False)
    assert _by_name(full, "error") == dict(videos["errors"], **{"mid_damaged.avi":
                                                               "decoding failed"})
    broken = [f for f in full.findings if f.where.endswith("mid_damaged.avi")][0]
    assert broken.detail.startswith("after ") and " frame(s), at " in broken.detail


def test_tool_kinetics_from_demo_config_uses_its_sampling_and_classes(videos, tmp_path):
    """The demo config: 8 frames, 2 apart at 16 fps (a clip needs 0.875 s) and a 4-class model:
    label 9 is out of range although no --num-classes is given."""
    listed = videos["dir"] / "list.csv"
    proc, lines = _tool("--config-file", "configs/Kinetics/rev_mvit_test_synthetic.py",
                        "--splits", "train", "--quick", "--workers", 2,
                        f"dataloader.train.data_path={listed}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    n_err = len(videos["errors"])
    assert lines[-1].startswith(f"check_dataset: {videos['entries']} entries checked: "
                                f"{n_err} errors ("), lines[-1]
    assert "1 label out of range" in lines[-1] and "1 too short" in lines[-1]
    settings = json.loads((tmp_path / "check_dataset_report.json").read_text())[
        "datasets"][0]["settings"]
    assert (settings["num_frames"], settings["sampling_rate"], settings["target_fps"],
            settings["num_classes"]) == (8, 2, 16.0, 4)
