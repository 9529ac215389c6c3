"""Reading competition PNGs."""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

K = TypeVar("K")


class ImageReadError(OSError):
    """A PNG that cannot be read; the message names the file."""


# The smallest side an image may have: no X-ray is smaller, and a network of output stride
# 32 cannot be given less. Together with "the size most images have" it is the one rule on
# image sizes (``size_problems``: the integrity check and inference apply it).
MIN_SIDE = 32


def read_image(path: str | Path, flags: int = cv2.IMREAD_GRAYSCALE) -> np.ndarray:
    """A competition PNG as a 2-D grey uint8 array (the data has R = G = B); ``flags``
    another ``cv2.IMREAD_*`` mode.

    The bytes are read by Python and decoded by ``cv2.imdecode``: ``cv2.imread`` takes the
    path as UTF-8 text and crashed the process (SIGSEGV) on a name that is not."""
    try:
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), np.uint8)
    except OSError:
        data = np.zeros(0, np.uint8)
    img = cv2.imdecode(data, flags) if data.size else None
    if img is None:
        raise ImageReadError(
            f"{printable(path)}: cannot decode image (missing, truncated or not a PNG)"
        )
    return img


def printable(path: str | Path) -> str:
    """``path`` as text that can be printed anywhere: bytes of a name that are not valid
    UTF-8 (kept by Python as surrogates) shown as ``\\xff``."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def size_problems(shapes: Mapping[K, tuple[int, int]]) -> list[tuple[K, str]]:
    """The images whose (height, width) breaks the rule on sizes, with what is wrong: a
    side under ``MIN_SIDE`` px (no model input, no submission can be made of it)."""
    return [
        (key, f"image of {w}x{h} px, below the {MIN_SIDE} px an image needs")
        for key, (h, w) in shapes.items()
        if min(h, w) < MIN_SIDE
    ]


def size_warnings(shapes: Mapping[K, tuple[int, int]]) -> list[tuple[K, str]]:
    """The images whose size differs from the one most images have: the competition's are
    all 2048 x 2048, so one that differs is worth a look; the pipeline handles it (each
    image is predicted and encoded at its own size, and validated against it)."""
    common = Counter(shapes.values()).most_common(1)[0][0] if shapes else None
    return [
        (key, f"image size {hw} differs from {common} (predicted and encoded at its own size)")
        for key, hw in shapes.items()
        if min(hw) >= MIN_SIDE and hw != common
    ]


def checked_shapes(table, what: str = "test") -> dict[str, tuple[int, int]]:
    """``png_shapes`` of a table from ``layout.discover``, refusing (``ImageReadError``,
    one line naming the files) images whose size ``verify_data.py`` rejects."""
    shapes = {p: png_shape(p) for p in table["image_path"]}
    bad = size_problems(shapes)
    if bad:
        listed = "; ".join(f"{printable(p)}: {m}" for p, m in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        root = Path(table["image_path"].iloc[0]).parents[3]
        raise ImageReadError(
            f"{len(bad)} {what} image(s) of a size no submission can be made for: {listed}{more}; "
            f"`python scripts/verify_data.py {printable(root)}` lists every problem"
        )
    return {n: shapes[p] for n, p in zip(table["name"], table["image_path"], strict=True)}


def png_shape(path: str | Path) -> tuple[int, int]:
    """(height, width) from the PNG header, without decoding the pixels."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise ImageReadError(f"{printable(path)}: cannot read ({e})") from e
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ImageReadError(f"{printable(path)}: not a PNG file")
    width, height = struct.unpack(">II", head[16:24])
    return int(height), int(width)


def png_shapes(table) -> dict[str, tuple[int, int]]:
    """Bare file name -> (height, width) for a table from ``layout.discover``."""
    return {name: png_shape(p) for name, p in zip(table["name"], table["image_path"], strict=True)}
