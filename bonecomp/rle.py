"""Run-length encoding in the competition convention, exact and fast.

A mask is flattened row-major (C order); runs of foreground (nonzero) pixels are written
``start length start length ...`` with 1-based starts, space separated; an empty mask is
the empty string. The shape is always an argument, never assumed.

Encoding scans the mask once with a compiled kernel (numba) that skips 8 pixels at a time
while nothing changes: ~12x faster than the classic numpy version (flatten, pad, compare
neighbours, ``np.where``, join) per mask, ~20x for a (29, H, W) stack scanned in parallel
(``encode_many``; see benchmarks/bench_rle.py). numpy alone has no single-pass "where does
the value change" primitive, hence the kernel. ``encode_many`` uses numba's thread pool:
call it from the main process, not from forked DataLoader workers.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_CAP = 4096  # run boundaries buffered per mask before a second, exact-size pass


class RLEError(ValueError):
    """A malformed RLE string; the message says what is wrong."""


# ---------------------------------------------------------------------------- encoding
def mask_to_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based run starts and lengths (int64) of a mask's nonzero pixels, row-major."""
    b = _bytes(mask).reshape(-1)
    out = np.empty(_CAP, np.int64)
    k = _boundaries(b, _words(b), out)
    if k > _CAP:
        out = np.empty(k, np.int64)
        _boundaries(b, _words(b), out)
    return _split(out[:k])


def encode(mask: np.ndarray) -> str:
    """RLE string of a 2-D mask (any shape; nonzero is foreground)."""
    if np.ndim(mask) != 2:
        raise ValueError(f"encode: expected a 2-D mask, got shape {np.shape(mask)}")
    return runs_to_string(*mask_to_runs(mask))


def encode_many(masks: np.ndarray) -> list[str]:
    """RLE strings of a (C, H, W) stack, one per channel; channels are scanned in parallel."""
    if np.ndim(masks) != 3:
        raise ValueError(f"encode_many: expected (C, H, W), got shape {np.shape(masks)}")
    flat = _bytes(masks).reshape(len(masks), -1)
    if flat.shape[1] % 8:
        return [encode(m) for m in masks]
    out = np.empty((len(flat), _CAP), np.int64)
    counts = np.empty(len(flat), np.int64)
    _boundaries_many(flat, flat.view(np.uint64), out, counts)
    strings = []
    for c, k in enumerate(counts):
        b = out[c, :k] if k <= _CAP else _exact(flat[c], k)
        strings.append(runs_to_string(*_split(b)))
    return strings


def crop_to_runs(
    crop: np.ndarray, y0: int, x0: int, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Runs of a full-size mask that is zero outside ``crop`` placed at (y0, x0)."""
    h, w = crop.shape
    H, W = shape
    if y0 < 0 or x0 < 0 or y0 + h > H or x0 + w > W:
        raise ValueError(f"crop {crop.shape} at ({y0}, {x0}) does not fit in {shape}")
    if h == 0 or w == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if w == W:  # rows are adjacent in the flat order: runs may wrap, keep them whole
        starts, lengths = mask_to_runs(crop)
        return starts + y0 * W, lengths
    padded = np.zeros((h, w + 1), np.uint8)  # a zero column stops runs at the row's end
    padded[:, :w] = _bytes(crop)
    starts, lengths = mask_to_runs(padded)
    rows, cols = np.divmod(starts, w + 1)
    return (rows + y0) * W + cols + x0, lengths


def runs_to_string(starts: np.ndarray, lengths: np.ndarray) -> str:
    """``start length ...`` with 1-based starts from 0-based starts."""
    if len(starts) == 0:
        return ""
    pairs = np.empty(2 * len(starts), np.int64)
    pairs[0::2] = starts + 1
    pairs[1::2] = lengths
    return " ".join(map(str, pairs.tolist()))


# ---------------------------------------------------------------------------- decoding
def string_to_runs(rle: str | float | None, shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Validated 0-based starts and lengths of an RLE string for a mask of ``shape``.

    "" / None / NaN (pandas' reading of an empty field) is the empty mask. Raises
    ``RLEError`` saying what is wrong: odd count, non-integers, non-positive start or
    length, starts not increasing, runs overlapping, or runs past the end.
    """
    empty = np.zeros(0, np.int64)
    if rle is None or (isinstance(rle, float) and math.isnan(rle)):
        return empty, empty
    if not isinstance(rle, str):
        raise RLEError(f"RLE must be a string, got {type(rle).__name__}")
    tokens = rle.split()
    if not tokens:
        return empty, empty
    if len(tokens) % 2:
        raise RLEError(f"odd number of values ({len(tokens)}): expected start/length pairs")
    bad = next((t for t in tokens if not (t.isascii() and t.isdigit())), None)
    if bad is not None:  # plain digits only: not "1.5", "x", "+1", "1_0", "-3"
        if bad.startswith("-") and bad[1:].isdigit():
            raise RLEError(f"start or length {bad} is not positive")
        raise RLEError(f"non-integer value {bad!r}")
    if any(len(t) > 18 for t in tokens):
        raise RLEError(f"value {max(tokens, key=len)} is out of range")
    vals = np.array(tokens, dtype=np.int64)  # validated digits: parses in C
    starts, lengths = vals[0::2], vals[1::2]
    size = int(np.prod(shape))
    if (starts < 1).any():
        raise RLEError(f"start {int(starts[starts < 1][0])} is not positive (starts are 1-based)")
    if (lengths < 1).any():
        raise RLEError(f"length {int(lengths[lengths < 1][0])} is not positive")
    if len(starts) > 1:
        d = np.diff(starts)
        if (d <= 0).any():
            i = int(np.flatnonzero(d <= 0)[0])
            raise RLEError(f"starts not increasing: {starts[i]} then {starts[i + 1]}")
        ends = starts + lengths - 1
        if (starts[1:] <= ends[:-1]).any():
            i = int(np.flatnonzero(starts[1:] <= ends[:-1])[0])
            raise RLEError(f"runs overlap: {starts[i]}+{lengths[i]} and {starts[i + 1]}")
    last = int(starts[-1] + lengths[-1] - 1)
    if last > size:
        raise RLEError(f"run ends at pixel {last}, past the end of a {shape[0]}x{shape[1]} mask")
    return starts - 1, lengths


def decode(rle: str | float | None, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of ``shape`` from an RLE string (validated as in ``string_to_runs``)."""
    starts, lengths = string_to_runs(rle, shape)
    return runs_to_mask(starts, lengths, shape)


def runs_to_mask(starts: np.ndarray, lengths: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    flat = np.zeros(int(np.prod(shape)), bool)
    for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
        flat[s : s + n] = True
    return flat.reshape(shape)


def runs_overlap(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> int:
    """Number of pixels in both run sets (each sorted and non-overlapping)."""
    (sa, la), (sb, lb) = a, b
    if len(sa) == 0 or len(sb) == 0:
        return 0
    cum = np.concatenate([[0], np.cumsum(lb)])

    def covered_before(x: np.ndarray) -> np.ndarray:  # pixels of b at positions < x
        i = np.searchsorted(sb, x, side="right") - 1
        inside = np.clip(x - sb[np.maximum(i, 0)], 0, lb[np.maximum(i, 0)])
        return np.where(i >= 0, cum[np.maximum(i, 0)] + inside, 0)

    return int((covered_before(sa + la) - covered_before(sa)).sum())


# ---------------------------------------------------------------------------- internals
def _bytes(mask: np.ndarray) -> np.ndarray:
    """The mask as contiguous, 8-byte aligned uint8, nonzero for foreground.

    uint8 values other than 0/1 are still right: the kernel tests ``!= 0`` and only its
    fast skip over all-ones words needs 1s.
    """
    m = np.asarray(mask)
    if m.dtype == bool:
        m = m.view(np.uint8)
    elif m.dtype != np.uint8:
        m = (m != 0).view(np.uint8)
    m = np.ascontiguousarray(m)
    return m if m.ctypes.data % 8 == 0 else m.copy()


def _words(flat: np.ndarray) -> np.ndarray:
    return flat[: flat.size // 8 * 8].view(np.uint64)


def _split(boundaries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = boundaries[0::2].copy()
    return starts, boundaries[1::2] - starts


def _exact(flat: np.ndarray, k: int) -> np.ndarray:
    out = np.empty(k, np.int64)
    _boundaries(flat, _words(flat), out)
    return out


@numba.njit(cache=True, nogil=True)
def _boundaries(flat, words, out):  # pragma: no cover - compiled
    """Write the positions where the mask turns on/off into ``out``; return their count.

    Whole 8-pixel words equal to the current state (all 0 or all 1) are skipped.
    Positions beyond ``len(out)`` are counted but not written.
    """
    k = 0
    on = False
    same = np.uint64(0)
    ones = np.uint64(0x0101010101010101)
    for i in range(words.size):
        if words[i] == same:
            continue
        for j in range(i * 8, i * 8 + 8):
            if (flat[j] != 0) != on:
                if k < out.size:
                    out[k] = j
                k += 1
                on = not on
        same = ones if on else np.uint64(0)
    for j in range(words.size * 8, flat.size):
        if (flat[j] != 0) != on:
            if k < out.size:
                out[k] = j
            k += 1
            on = not on
    if on:
        if k < out.size:
            out[k] = flat.size
        k += 1
    return k


@numba.njit(parallel=True, cache=True)
def _boundaries_many(flat, words, out, counts):  # pragma: no cover - compiled
    for c in numba.prange(flat.shape[0]):
        counts[c] = _boundaries(flat[c], words[c], out[c])
