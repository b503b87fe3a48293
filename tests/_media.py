"""Files as people have them, made in the tests: images in the PIL modes people have and
broken ones (with a COCO json over them), real-codec videos written with PyAV and broken ones.
Used by test_own_data_images.py, test_own_data_videos.py and test_check_dataset.py."""
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO_DETECTOR = "configs/COCO/mask_rcnn_revvit_synthetic.py"

# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
W, H = 128, 96  # landscape; the EXIF-rotated file shows as H x W
BOX = [32, 24, 64, 48]  # x, y, w, h: the red square drawn on every image

# The expected outcome of each file: None = loads; otherwise the reason it is skipped.
GOOD_IMAGES = ("rgb.png", "gray.jpg", "cmyk.jpg", "palette.png", "gray16.png", "rgba.png",
        "exif6.jpg", "progressive.jpg")
BAD_IMAGES = {"truncated.jpg": "unreadable", "text.jpg": "unreadable", "empty.jpg": "empty file",
       "folder.jpg": "not a file", "missing.jpg": "missing",
       "mismatch.png": "size differs from the annotation",
       "exif6_raw.jpg": "size differs from the annotation"}
NO_ANNOTATION = "no_annotation.png"  # removed by detectron2's filter_empty at build time



def rgb_array():
    a = np.zeros((H, W, 3), np.uint8)
    a[..., 2] = 40
    x, y, w, h = BOX
    a[y:y + h, x:x + w] = (220, 30, 30)
    return a


def make_images(d: Path) -> dict:
    """Every file of GOOD, BAD and NO_ANNOTATION under `d` (the `missing` one excepted)."""
    d.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(rgb_array())
    rgb.save(d / "rgb.png")
    rgb.save(d / NO_ANNOTATION)
    rgb.convert("L").save(d / "gray.jpg", quality=95)
    rgb.convert("CMYK").save(d / "cmyk.jpg", quality=95)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    pal.save(d / "palette.png", transparency=0)
    Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(d / "gray16.png")
    rgba = np.concatenate([rgb_array(), np.full((H, W, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    for name in ("exif6.jpg", "exif6_raw.jpg"):
        rgb.save(d / name, quality=95, exif=exif.tobytes())
    rgb.save(d / "progressive.jpg", quality=95, progressive=True)
    full = (d / "progressive.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (d / "text.jpg").write_text("not an image\n")
    (d / "empty.jpg").write_bytes(b"")
    (d / "folder.jpg").mkdir(exist_ok=True)
    rgb.resize((W // 2, H // 2)).save(d / "mismatch.png")  # resized after annotating
    return {"root": d}


def write_coco(d: Path, names) -> Path:
    """A COCO json over `names` (in `d`), one annotation each except NO_ANNOTATION. The EXIF
    file is declared with its displayed size, exif6_raw.jpg with its stored size, and
    mismatch.png with the size it had before it was halved."""
    x, y, w, h = BOX
    poly = [x, y, x + w, y, x + w, y + h, x, y + h]
    images, annotations = [], []
    for i, name in enumerate(names, 1):
        width, height = (H, W) if name == "exif6.jpg" else (W, H)
        images.append({"id": i, "file_name": name, "width": width, "height": height})
        if name != NO_ANNOTATION:
            box, seg = ([8, 8, 40, 40], [8, 8, 48, 8, 48, 48, 8, 48]) if width < height \
                else (BOX, poly)
            annotations.append({"id": i, "image_id": i, "category_id": 1, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0,
                                "segmentation": [[float(v) for v in seg]]})
    path = d / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "square"}]}))
    return path



#: The files of an ImageFolder made by make_imagefolder that cannot be read, and why.
IMAGEFOLDER_BAD = {"truncated.jpg": "unreadable", "text.jpg": "unreadable",
                   "empty.jpg": "empty file"}


def make_imagefolder(src: Path, dst: Path) -> Path:
    """``dst/val/class_{0,1}/...``: the good images and IMAGEFOLDER_BAD, made in `src` first,
    alternating between the two classes; returns the ``val`` folder."""
    make_images(src)
    root = dst / "val"
    for i, name in enumerate(list(GOOD_IMAGES) + list(IMAGEFOLDER_BAD)):
        cls = root / f"class_{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        (cls / name).write_bytes((src / name).read_bytes())
    return root


_COCO_CONFIG = """
import os
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog
from revvit_d2.d2 import register_coco_instances

# A dataset of one's own, registered on top of the demo config (docs/datasets.md).
_here = os.path.dirname(__file__)
if "{name}" not in DatasetCatalog.list():
    register_coco_instances("{name}", {{}}, os.path.join(_here, "{json}"), _here)
_demo = LazyConfig.load("{demo}")
model, optimizer, lr_multiplier = _demo.model, _demo.optimizer, _demo.lr_multiplier
dataloader, train = _demo.dataloader, _demo.train
dataloader.train.dataset.names = "{name}"
dataloader.train.aspect_ratio_grouping = False  # every image is met in the first iterations
dataloader.test.dataset.names = "{name}"
dataloader.evaluator.dataset_name = "{name}"
"""


def write_coco_config(d: Path, json_name: str, name: str = "own_train") -> Path:
    """A config file in `d` that registers ``d/json_name`` (images in `d`) as `name` and trains
    and tests the demo detector on it."""
    path = d / f"config_{Path(json_name).stem}.py"
    path.write_text(_COCO_CONFIG.format(name=name, json=json_name, demo=ROOT / DEMO_DETECTOR))
    return path

# --------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------
FPS = 16
GOOD_FRAMES = 20  # 1.25 s


def need_codec(name: str):
    try:
        av.codec.Codec(name, "w")
    except Exception:  # noqa: BLE001 - any failure: this av build cannot write it
        pytest.skip(f"the local av build has no {name} encoder")


def _frame(i: int, w: int, h: int) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (37 * i) % 256
    img[: h // 2, : w // 2, 1] = 200
    return img


def write_video(path: Path, codec: str, size=(32, 32), frames: int = GOOD_FRAMES, fps: int = FPS,
                pix_fmt: str = "yuv420p", pts_ms=None, audio: bool = False) -> Path:
    """A real video: `codec`, `size` (w, h), `frames` at `fps`, or at the times `pts_ms`
    (variable frame rate); with an AAC track when `audio`."""
    w, h = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        sound = out.add_stream("aac", rate=16000) if audio else None
        for i in range(frames if pts_ms is None else len(pts_ms)):
            frame = av.VideoFrame.from_ndarray(_frame(i, w, h), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = int(pts_ms[i]), Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if sound is not None:
            _encode_silence(out, sound, seconds=frames / fps)
    return path


def _encode_silence(out, stream, seconds: float):
    n = 1024
    for i in range(int(seconds * 16000 / n) + 1):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, n), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate, frame.pts = 16000, i * n
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        _encode_silence(out, out.add_stream("aac", rate=16000), seconds=2.0)
    return path


# name -> (writer, codec it needs)
GOOD_VIDEOS = {
    "h264_32x32.mp4": (lambda p: write_video(p, "libx264"), "libx264"),
    "h264_33x17_444.mp4": (lambda p: write_video(p, "libx264", (33, 17), pix_fmt="yuv444p"),
                           "libx264"),
    "mpeg4_33x17.mp4": (lambda p: write_video(p, "mpeg4", (33, 17)), "mpeg4"),
    "mjpeg_33x17.avi": (lambda p: write_video(p, "mjpeg", (33, 17), pix_fmt="yuvj420p"),
                        "mjpeg"),
    "vp8_32x24.webm": (lambda p: write_video(p, "libvpx", (32, 24)), "libvpx"),
    "mpeg4_vfr.mp4": (lambda p: write_video(p, "mpeg4", pts_ms=[0, 40, 50, 200, 210, 400, 700,
                                                                 1000, 1033, 1100, 1250, 1400]),
                      "mpeg4"),
    "h264_with_audio.mp4": (lambda p: write_video(p, "libx264", audio=True), "libx264"),
}


def write_bad_videos(d: Path):
    """The broken files and their reasons (file name -> reason)."""
    long = write_video(d / "long.mp4", "mpeg4", frames=64)
    data = long.read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is lost
    avi = write_video(d / "long.avi", "mjpeg", frames=64, pix_fmt="yuvj420p").read_bytes()
    (d / "cut_frames.avi").write_bytes(avi[: int(len(avi) * 0.3)])  # header, frames undecodable
    (d / "zero.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n")
    write_audio_only(d / "audio.m4a")
    write_audio_only(d / "audio_only.mp4")
    long.unlink()
    (d / "long.avi").unlink()
    return {"truncated.mp4": "unreadable", "cut_frames.avi": "no frame decoded",
            "zero.mp4": "empty file", "text.mp4": "unreadable", "audio.m4a": "no video stream",
            "audio_only.mp4": "no video stream", "missing.mp4": "file not found"}


#: A video shorter than one clip (2 frames, 0.125 s): used, not skipped.
SHORT = "two_frames.mp4"
