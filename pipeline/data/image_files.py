"""Image files of a COCO set: listing, full decodes with held warnings, re-encoding to RGB PNG.

`check_images` decodes every file once (threads: PIL releases the GIL); what PIL warns about a file is
kept with that file's `ImageCheck`, to be counted in the prepare report.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.machine import usable_cores

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Formats whose bytes are stored as read (when 8-bit RGB); anything else is re-encoded as PNG.
KEPT_FORMATS = ("JPEG", "PNG")
# What PIL's decoders raise on broken input (truncation, bad CRC, unknown format, bombs, ...).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageCheck:
    """Outcome of decoding one image file: status is "ok", "missing" or "corrupt"."""

    status: str
    width: int = 0
    height: int = 0
    convert: bool = False
    warnings: tuple[str, ...] = ()  # what the decoder warned about this file ("DecompressionBombWarning: ...")


def list_image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive), sorted by relative path."""
    found = [
        Path(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    ]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def inspect_bytes(data: bytes) -> tuple[int, int, bool]:
    """Fully decode encoded image bytes -> (width, height, needs conversion); raises DECODE_ERRORS."""
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.width, img.height, _needs_conversion(img, data)


def _needs_conversion(img: Image.Image, data: bytes) -> bool:
    sixteen_bit_png = img.format == "PNG" and data[12:16] == b"IHDR" and data[24] == 16
    return img.format not in KEPT_FORMATS or img.mode != "RGB" or sixteen_bit_png


_decoding = threading.local()  # .found: the warnings about the file this thread is decoding


@contextlib.contextmanager
def image_warnings_held() -> Iterator[None]:
    """While users' images are decoded (on any thread): what PIL warns about a file (a header that claims
    10,000 x 10,000 pixels) goes to that file's `ImageCheck.warnings`, to be counted, never to the console."""
    with warnings.catch_warnings():
        warnings.filterwarnings("always", category=Image.DecompressionBombWarning)
        warnings.filterwarnings("always", module=r"PIL(\.|$)")
        shown = warnings.showwarning

        def hold(message, category, filename, lineno, file=None, line=None):
            found = getattr(_decoding, "found", None)
            if found is None:  # not about an image being decoded: as usual
                shown(message, category, filename, lineno, file, line)
            else:
                found.append(f"{category.__name__}: {message}")

        warnings.showwarning = hold
        yield


@contextlib.contextmanager
def _collecting() -> Iterator[list[str]]:
    _decoding.found = found = []
    try:
        yield found
    finally:
        _decoding.found = None


def check_image(path: Path) -> ImageCheck:
    try:
        data = path.read_bytes()
    except (OSError, ValueError):  # ValueError: a file name with a NUL byte
        return ImageCheck("missing")
    with _collecting() as found:
        try:
            width, height, convert = inspect_bytes(data)
        except DECODE_ERRORS:
            return ImageCheck("corrupt", warnings=tuple(found))
    return ImageCheck("ok", width, height, convert, tuple(found))


def check_images(paths: list[Path]) -> list[ImageCheck]:
    """check_image over many files; PIL releases the GIL while decoding, so threads scale."""
    with image_warnings_held(), ThreadPoolExecutor(max_workers=usable_cores()) as pool:
        return list(pool.map(check_image, paths))


def to_rgb_png(data: bytes) -> bytes:
    """Re-encode any decodable image as an 8-bit RGB PNG (16-bit values are scaled, not clipped)."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = _to_rgb(img)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I"):
        scaled = np.asarray(img).astype(np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def encoded_image(path: Path, convert: bool) -> bytes:
    """The bytes stored in the `image` column: the file as read, or its RGB PNG re-encoding."""
    data = path.read_bytes()
    if not convert:
        return data
    with _collecting():  # counted when the file was checked
        return to_rgb_png(data)
