"""Image files as people have them: the PIL modes that need care, and why a file could not be
used, in words.

* :func:`high_bit_to_8bit` turns 16/32-bit grayscale (``I;16``, ``I``, ``F``) into 8-bit ``L``;
  ``Image.convert("RGB")`` saturates every value above 255 to white instead.
* :func:`size_mismatch` says how an image's size differs from the one its annotation declares.
* :func:`read_failure_reason` names the reason a file could not be read (``missing``,
  ``not a file``, ``empty file``, ``unreadable``), for counts per reason.

Shared by the ImageFolder reader (:mod:`revvit_d2.data.imagefolder`) and the detection mapper
(:mod:`revvit_d2.d2.data`).
"""
import os
import struct
from typing import Optional, Tuple

import numpy as np
from PIL import Image

__all__ = ["HIGH_BIT_MODES", "READ_ERRORS", "SIZE_DIFFERS", "high_bit_to_8bit",
           "read_failure_reason", "size_mismatch"]

#: The reason given for an image whose size differs from its annotation's.
SIZE_DIFFERS = "size differs from the annotation"

HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")

#: What PIL and the file system raise for a file that cannot be decoded: UnidentifiedImageError
#: and "image file is truncated" are OSErrors; some broken headers raise SyntaxError,
#: ValueError, EOFError or struct.error; DecompressionBombError is a plain Exception.
READ_ERRORS: Tuple[type, ...] = (OSError, ValueError, SyntaxError, EOFError, struct.error,
                                 Image.DecompressionBombError)


def high_bit_to_8bit(image: Image.Image) -> Image.Image:
    """`image` unchanged, or, for a 16/32-bit grayscale mode, 8-bit ``L``: values divided by 257
    when the image is 16-bit (or uses that range), ``F`` images in 0-1 scaled by 255."""
    if image.mode not in HIGH_BIT_MODES:
        return image
    a = np.asarray(image, dtype=np.float64)
    if a.size and (a.max() > 255 or image.mode.startswith("I;16")):
        a = a / 257.0
    elif image.mode == "F" and a.size and a.max() <= 1.0:
        a = a * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def read_failure_reason(path, error: BaseException) -> str:
    """Why `path` could not be read, as a short label: ``missing``, ``not a file``,
    ``empty file`` or ``unreadable`` (anything else: garbage, truncated, unsupported)."""
    if isinstance(error, FileNotFoundError):
        return "missing"
    try:
        if isinstance(error, IsADirectoryError) or os.path.isdir(path):
            return "not a file"
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            return "empty file"
    except (OSError, TypeError, ValueError):
        pass
    return "unreadable"


def size_mismatch(declared: Tuple[int, int], actual: Tuple[int, int]) -> Optional[str]:
    """The difference between the ``(width, height)`` an index declares and the image's, in
    words, or None when they agree; says when width and height are swapped (a json written
    from the file before its EXIF rotation)."""
    declared, actual = tuple(int(v) for v in declared), tuple(int(v) for v in actual)
    if declared == actual:
        return None
    hint = ("; width and height swapped: was the json written from the file before its EXIF "
            "rotation?" if declared == actual[::-1] else "")
    return (f"declared {declared[0]}x{declared[1]} (width x height), actual "
            f"{actual[0]}x{actual[1]}{hint}")
