"""The built-in synthetic video dataset in the Kinetics layout, written with PyAV.

No real video data can be downloaded here, so the demo and the tests train and test on short
generated clips whose classes differ only by **motion**: every video shows a disc of random
colour, size and position on a random background, with a static distractor disc of another
colour and mild per-frame noise. The class is what the disc does over time:

=========  ====================================================================
label      motion
=========  ====================================================================
0 move_up     the disc moves up at a random speed
1 move_down   the disc moves down at a random speed
2 grow        the disc's radius grows (random start radius and rate)
3 shrink      the disc's radius shrinks (random start radius and rate)
=========  ====================================================================

A single frame does not tell the classes apart (positions and radii are drawn so that every
class covers the same range), and the four motions are invariant under a horizontal flip, so the
official training augmentation (random flip included) keeps every label valid.

Layout (Kinetics style, as read by ``pytorchvideo.data.Kinetics``)::

    <root>/train/<class>/<class>_<iiii>.mp4
    <root>/val/<class>/<class>_<iiii>.mp4
    <root>/train.csv, <root>/val.csv     lines "<path relative to root> <label>"
    <root>/classes.txt                   class names, line i = label i
    <root>/.complete                     marker holding the generation parameters

Generation is deterministic (one seeded RNG per video; frames converted to YUV 4:2:0 here and
encoded with FFmpeg's single-threaded ``mpeg4`` encoder, so files are byte-identical from run to
run) and idempotent.
"""
import logging
import os
import random
from pathlib import Path
from typing import Dict, Tuple, Union

import av
import numpy as np

from revvit_d2.utils.paths import default_datasets_root

from ..generated import generate_once

logger = logging.getLogger(__name__)

__all__ = [
    "MOTION_CLASSES",
    "default_synthetic_root",
    "make_synthetic_kinetics",
    "render_video",
    "rgb_to_yuv420p",
    "write_video",
]

MOTION_CLASSES = ("move_up", "move_down", "grow", "shrink")
_FORMAT_VERSION = 1


def default_synthetic_root() -> Path:
    """Where the built-in synthetic Kinetics-layout dataset lives
    (``<datasets>/kinetics_synthetic``)."""
    return default_datasets_root() / "kinetics_synthetic"


def render_video(motion: str, rng: random.Random, num_frames: int = 32,
                 size: Tuple[int, int] = (96, 72)) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 of one synthetic video of class `motion`.

    Args:
        motion: one of :data:`MOTION_CLASSES`.
        rng: the video's random generator (all random choices come from it).
        num_frames: T.
        size: (width, height).
    """
    if motion not in MOTION_CLASSES:
        raise ValueError(f"unknown motion {motion!r}; one of {MOTION_CLASSES}")
    w, h = int(size[0]), int(size[1])
    # A bright disc on a dark background (random hues): the contrast polarity is fixed so that
    # the direction of motion is a simple spatio-temporal pattern to learn.
    bg = np.array([rng.uniform(0, 90) for _ in range(3)], dtype=np.float32)
    fg = np.array([rng.uniform(150, 255) for _ in range(3)], dtype=np.float32)
    distractor = np.array([rng.uniform(60, 200) for _ in range(3)], dtype=np.float32)
    last = num_frames - 1
    short = min(w, h)
    # The moving disc stays in the centre 60 % of the width, which survives the test-time centre
    # crop of non-square frames.
    x_lo, x_hi = 0.2 * w, 0.8 * w
    if motion in ("move_up", "move_down"):
        r = rng.uniform(0.09, 0.15) * short
        travel = rng.uniform(0.55, 0.85) * (h - 2 * r)
        top = rng.uniform(r, h - r - travel)  # the trajectory is [top, top + travel]
        cx = rng.uniform(x_lo + r, x_hi - r)
        ys = [top + travel * t / last for t in range(num_frames)]
        if motion == "move_up":
            ys = ys[::-1]
        centres = [(cx, y) for y in ys]
        radii = [r] * num_frames
    else:
        r_small = rng.uniform(0.05, 0.1) * short
        r_big = r_small + rng.uniform(0.18, 0.26) * short
        cx = rng.uniform(x_lo + r_big, x_hi - r_big) if x_hi - x_lo > 2 * r_big else w / 2
        cy = rng.uniform(r_big, h - r_big) if h > 2 * r_big else h / 2
        radii = [r_small + (r_big - r_small) * t / last for t in range(num_frames)]
        if motion == "shrink":
            radii = radii[::-1]
        centres = [(cx, cy)] * num_frames
    # Static distractor somewhere else (it may overlap; it is drawn below the moving disc).
    dr = rng.uniform(0.06, 0.12) * short
    dx, dy = rng.uniform(dr, w - dr), rng.uniform(dr, h - dr)
    noise_seed = rng.randrange(2**31)

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.empty((h, w, 3), np.float32)
    base[:] = bg
    alpha = np.clip(dr - np.sqrt((xx - dx) ** 2 + (yy - dy) ** 2) + 0.5, 0.0, 1.0)[..., None]
    base = base * (1 - alpha) + distractor * alpha
    noise_rng = np.random.default_rng(noise_seed)
    frames = np.empty((num_frames, h, w, 3), np.uint8)
    for t in range(num_frames):
        (cx_t, cy_t), r_t = centres[t], radii[t]
        # Anti-aliased disc so that sub-pixel motion is visible.
        dist = np.sqrt((xx - cx_t) ** 2 + (yy - cy_t) ** 2)
        alpha = np.clip(r_t - dist + 0.5, 0.0, 1.0)[..., None]
        frame = base * (1 - alpha) + fg * alpha
        frame += noise_rng.normal(0.0, 4.0, size=frame.shape).astype(np.float32)
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3H/2, W) uint8 planar YUV 4:2:0 (BT.601, limited range; chroma is
    the mean of each 2x2 block), the layout of ``av.VideoFrame.from_ndarray(..., "yuv420p")``.

    Converting here instead of in FFmpeg's swscale keeps the files byte-identical from run to run
    (swscale's SIMD paths depend on buffer alignment and round differently)."""
    rgb = frame.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    u = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0
    v = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0
    h, w = y.shape

    def half(c):
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [y.reshape(-1), half(u).reshape(-1), half(v).reshape(-1)]
    out = np.concatenate(planes).reshape(h * 3 // 2, w)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_video(path: Union[str, os.PathLike], frames: np.ndarray, fps: int = 16,
                codec: str = "mpeg4") -> None:
    """Encode frames (T, H, W, 3) uint8 RGB to an mp4 with PyAV (yuv420p, one thread).

    ``mpeg4`` (FFmpeg's own MPEG-4 part 2 encoder, quantiser 1-3) writes byte-identical files
    for identical frames. ``libx264`` (crf 18) works too, but its output was seen to vary from
    run to run in the same process (same frames, one thread), so it is not the default. H and W
    must be even for yuv420p.
    """
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame size {w}x{h} must be even for yuv420p")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        elif codec == "mpeg4":
            stream.options = {"qmin": "1", "qmax": "3"}
        for frame in frames:
            yuv = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
            for packet in stream.encode(yuv):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_synthetic_kinetics(root: Union[str, os.PathLike], train_per_class: int = 48,
                            val_per_class: int = 24, num_frames: int = 32, fps: int = 16,
                            size: Tuple[int, int] = (96, 72), seed: int = 0,
                            codec: str = "mpeg4") -> Path:
    """Write (once) the synthetic motion dataset described in the module docstring.

    Idempotent and safe across processes (:func:`revvit_d2.data.generated.generate_once`): a
    ``.complete`` marker holding the parameters is written last, under a file lock. If it exists
    with the same parameters nothing is done; otherwise (other parameters, or an interrupted
    earlier run, recognised by its ``.in_progress`` marker) everything is rewritten. A folder
    holding ``train/``, ``val/``, the list files or ``classes.txt`` without either marker was not
    made here and is left alone (``FileExistsError``).

    Args:
        root: output folder.
        train_per_class, val_per_class: videos per class and split (validation videos are
            distinct random draws, not copies of training videos).
        num_frames, fps: length of each video (default 32 frames at 16 fps = 2 s).
        size: (width, height), both even.
        seed: base seed.
        codec: ``mpeg4`` (default, byte-reproducible) or ``libx264``.

    Returns:
        ``Path(root)``.
    """
    root = Path(root)
    w, h = int(size[0]), int(size[1])
    params = dict(version=_FORMAT_VERSION, classes=list(MOTION_CLASSES),
                  train_per_class=int(train_per_class), val_per_class=int(val_per_class),
                  num_frames=int(num_frames), fps=int(fps), size=[w, h], seed=int(seed),
                  codec=codec)
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2, got {num_frames}")
    counts: Dict[str, int] = {}

    def generate():
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            lines = []
            for label, motion in enumerate(MOTION_CLASSES):
                folder = root / split / motion
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    rng = random.Random(f"revvit-kinetics-synthetic-{seed}-{split}-{motion}-{i}")
                    frames = render_video(motion, rng, num_frames, (w, h))
                    rel = f"{split}/{motion}/{motion}_{i:04d}.mp4"
                    write_video(root / rel, frames, fps=fps, codec=codec)
                    lines.append(f"{rel} {label}")
            # Interleave the classes so that a prefix of the list is balanced (for subsets).
            per = max(1, per_class)
            lines = [lines[c * per + i] for i in range(per_class)
                     for c in range(len(MOTION_CLASSES))]
            (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
            counts[split] = len(lines)
        (root / "classes.txt").write_text("\n".join(MOTION_CLASSES) + "\n")

    owned = ("train", "val", "train.csv", "val.csv", "classes.txt")
    if not generate_once(root, params, owned, "make_synthetic_kinetics", generate):
        return root
    logger.info("wrote synthetic Kinetics-layout dataset %s: %d classes (%s), %d train + %d val "
                "videos of %d frames at %d fps, %dx%d", root, len(MOTION_CLASSES),
                ", ".join(MOTION_CLASSES), counts["train"], counts["val"], num_frames, fps, w, h)
    return root
