"""Reading competition PNGs."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np


class ImageReadError(OSError):
    """A PNG that cannot be read; the message names the file."""


def read_image(path: str | Path) -> np.ndarray:
    """A competition PNG as a 2-D grey uint8 array (the data has R = G = B)."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ImageReadError(f"{path}: cannot decode image (missing, truncated or not a PNG)")
    return img


def png_shape(path: str | Path) -> tuple[int, int]:
    """(height, width) from the PNG header, without decoding the pixels."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read ({e})") from e
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ImageReadError(f"{path}: not a PNG file")
    width, height = struct.unpack(">II", head[16:24])
    return int(height), int(width)


def png_shapes(table) -> dict[str, tuple[int, int]]:
    """Bare file name -> (height, width) for a table from ``layout.discover``."""
    return {name: png_shape(p) for name, p in zip(table["name"], table["image_path"], strict=True)}
