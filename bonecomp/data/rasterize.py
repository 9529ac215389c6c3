"""Polygons -> (C, H, W) multilabel masks at any resolution.

At the source resolution the mask is ``cv2.fillPoly`` of the raw points: that *is* the
ground truth. At any other size each polygon is drawn directly at the target resolution:
a target pixel is set when its centre, mapped back to the source frame (pixel-centre
mapping), falls inside the region ``cv2.fillPoly`` would paint there. That region is the
polygon grown by about half a source pixel (OpenCV also paints the outline), which we
model as a diamond of radius 0.5 source px. Filling at 2048 and resizing costs ~100x more
and is less accurate against the area-average of the 2048 truth (see benchmarks/).

``coverage`` is the same sampling with k x k sub-samples per pixel: each class's
fractional coverage, used as soft training targets.

The scanline kernel is hand-written (numba) because no library rasterizes with
sub-pixel, pixel-centre semantics at this speed; cv2 always paints outline pixels.
"""

from __future__ import annotations

import math

import cv2
import numba
import numpy as np

from bonecomp.data.annotations import Polygons

# Half a source pixel: the outline OpenCV paints around a polygon at the source size.
_OUTLINE = 0.5


def rasterize(
    polygons: Polygons,
    src_hw: tuple[int, int],
    out_hw: tuple[int, int] | None = None,
    out: np.ndarray | None = None,
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Binary masks (C, H, W) uint8 in {0, 1} of the polygons drawn at ``out_hw``.

    ``src_hw`` is the (height, width) of the image the points refer to (the PNG's shape).
    ``out`` may be a preallocated zeroed (C, H, W) uint8 array to avoid an allocation.
    ``window`` (y0, x0, h, w): only that part of the ``out_hw`` frame is drawn, giving
    (C, h, w) equal to the full raster's crop at a fraction of the cost (a training patch).
    """
    out_hw = tuple(src_hw) if out_hw is None else tuple(out_hw)
    y0, x0, h, w = window if window is not None else (0, 0, *out_hw)
    out = _output(len(polygons), (h, w), out)
    if out_hw == tuple(src_hw) and window is None:
        for c in range(len(polygons)):
            cv2.fillPoly(out[c], [polygons[c]], 1)
        return out
    if out_hw == tuple(src_hw):  # each bone's exact box, pasted where it meets the window
        for c in range(len(polygons)):  # (fillPoly on the window itself clips differently)
            by, bx, crop = class_crop(polygons[c], src_hw)
            ys, xs = max(by, y0), max(bx, x0)
            ye, xe = min(by + crop.shape[0], y0 + h), min(bx + crop.shape[1], x0 + w)
            if ye > ys and xe > xs:
                out[c, ys - y0 : ye - y0, xs - x0 : xe - x0] = crop[
                    ys - by : ye - by, xs - bx : xe - bx
                ]
        return out
    return draw(
        to_frame(polygons.points, src_hw, out_hw) - np.array([x0, y0], np.float64),
        polygons.offsets,
        (h, w),
        outline(src_hw, out_hw),
        k=1,
        out=out,
    )


def coverage(
    polygons: Polygons,
    src_hw: tuple[int, int],
    out_hw: tuple[int, int],
    k: int = 4,
) -> np.ndarray:
    """Fractional coverage (C, H, W) uint8 in 0..255 from k x k sub-samples per pixel.

    255 means all k*k sub-samples of the pixel lie inside the class's ground-truth region.
    """
    return draw(
        to_frame(polygons.points, src_hw, out_hw),
        polygons.offsets,
        tuple(out_hw),
        outline(src_hw, out_hw),
        k,
    )


def to_frame(points: np.ndarray, src_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """Source pixel coordinates -> target ones (pixel centres at integers), float64 (N, 2)."""
    (sh, sw), (th, tw) = src_hw, out_hw
    if min(sh, sw, th, tw) <= 0:
        raise ValueError(f"rasterize: sizes must be positive, got src {src_hw} out {out_hw}")
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    return (pts + 0.5) * np.array([tw / sw, th / sh]) - 0.5


def outline(src_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[float, float]:
    """The half source pixel OpenCV paints around a polygon, in target pixels (x, y)."""
    return _OUTLINE * out_hw[1] / src_hw[1], _OUTLINE * out_hw[0] / src_hw[0]


def draw(
    points: np.ndarray,
    offsets: np.ndarray,
    out_hw: tuple[int, int],
    grow: tuple[float, float] = (0.0, 0.0),
    k: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Draw float polygons given in the target frame (e.g. after augmentation).

    ``points[offsets[c]:offsets[c+1]]`` is class c's outline; ``grow`` widens it by a
    diamond of (dx, dy) target pixels. k = 1 gives {0, 1} masks; k > 1 gives coverage in
    0..255 from k x k sub-samples per pixel.
    """
    if not 1 <= k <= 15:  # counts live in uint8: 15 x 15 = 225 sub-samples at most
        raise ValueError(f"rasterize: k (data.soft_k) must be in 1..15, got {k}")
    out = _output(len(offsets) - 1, tuple(out_hw), out)
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    # Sub-sample count -> stored value: {0, 1} for masks, 0..255 for coverage.
    lut = np.round(np.arange(k * k + 1) * (255.0 / (k * k))).astype(np.uint8)
    _draw_all(
        np.ascontiguousarray(pts[:, 0]),
        np.ascontiguousarray(pts[:, 1]),
        np.asarray(offsets, np.int64),
        k,
        float(grow[0]),
        float(grow[1]),
        lut,
        out,
    )
    return out


def class_crop(points: np.ndarray, src_hw: tuple[int, int]) -> tuple[int, int, np.ndarray]:
    """One polygon's exact source-size mask as (y0, x0, crop uint8) over its bounding box.

    Equal to ``cv2.fillPoly`` on the full image, cropped: OpenCV paints nothing outside
    the points' bounding box, and an integer shift does not change its raster.
    """
    h, w = src_hw
    pts = np.asarray(points, np.int32).reshape(-1, 2)
    x0, y0 = max(int(pts[:, 0].min()), 0), max(int(pts[:, 1].min()), 0)
    x1, y1 = min(int(pts[:, 0].max()) + 1, w), min(int(pts[:, 1].max()) + 1, h)
    if x1 <= x0 or y1 <= y0:
        return 0, 0, np.zeros((0, 0), np.uint8)
    crop = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(crop, [pts - np.array([x0, y0], np.int32)], 1)
    return y0, x0, crop


def truth_crops(polygons: Polygons, src_hw: tuple[int, int]) -> list[tuple[int, int, np.ndarray]]:
    """``class_crop`` of every class: the exact ground truth without full-size masks."""
    return [class_crop(polygons[c], src_hw) for c in range(len(polygons))]


def _output(channels: int, out_hw: tuple[int, int], out: np.ndarray | None) -> np.ndarray:
    shape = (channels, *out_hw)
    if out is None:
        return np.zeros(shape, np.uint8)
    if out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"rasterize: out must be uint8 {shape}, got {out.dtype} {out.shape}")
    return out


# Serial on purpose: DataLoader workers call this in forked processes, where numba's
# parallel (workqueue) threading layer can deadlock. Classes are small; one core suffices.
@numba.njit(cache=True, nogil=True)
def _draw_all(xs, ys, offsets, k, dx, dy, lut, out):  # pragma: no cover - compiled
    for c in range(len(offsets) - 1):
        a, b = offsets[c], offsets[c + 1]
        if b - a >= 3:
            _draw_one(xs[a:b], ys[a:b], k, dx, dy, lut, out[c])


@numba.njit(cache=True, nogil=True)
def _draw_one(px, py, k, dx, dy, lut, out):  # pragma: no cover - compiled
    """Count, per pixel, the k*k sub-samples inside the polygon grown by a diamond (dx, dy),
    and store ``lut[count]``.

    Sub-row q samples y = (q + 0.5) / k - 0.5. The diamond is approximated by the union of
    the crossings at y (spans widened by dx) and at y - dy and y + dy (spans as they are).
    """
    h, w = out.shape
    n = len(px)
    nq = h * k
    offs = (0.0, -dy, dy)
    grow = (dx, 0.0, 0.0)
    if min(px) - dx > w - 0.5 or max(px) + dx < -0.5:
        return  # left or right of the frame (a bone outside a training patch)
    # The sub-rows each edge crosses, per family of scanlines; only the rows between the
    # first and the last are bucketed (a bone's height, not the frame's).
    q_lo = np.empty((3, n), np.int64)
    q_hi = np.empty((3, n), np.int64)
    q_first, q_last = nq, -1
    for f in range(3):
        for e in range(n):
            y0, y1 = py[e], py[(e + 1) % n]
            lo, hi = min(y0, y1), max(y0, y1)
            q0 = max(math.ceil((lo + 0.5 - offs[f]) * k - 0.5), 0)
            q1 = min(math.ceil((hi + 0.5 - offs[f]) * k - 0.5) - 1, nq - 1)
            q_lo[f, e], q_hi[f, e] = q0, q1
            if q0 <= q1:
                q_first = min(q_first, q0)
                q_last = max(q_last, q1)
    if q_last < q_first:
        return  # above or below the frame
    m = q_last - q_first + 1
    # Bucket the edge crossings by sub-row (counting sort); row j is sub-row q_first + j.
    counts = np.zeros((3, m + 1), np.int64)
    for f in range(3):
        for e in range(n):
            for q in range(q_lo[f, e], q_hi[f, e] + 1):
                counts[f, q - q_first + 1] += 1
    starts = np.empty((3, m + 1), np.int64)
    for f in range(3):
        starts[f, 0] = 0
        for j in range(m):
            starts[f, j + 1] = starts[f, j] + counts[f, j + 1]
    fill = starts.copy()
    xcross = np.empty((3, max(starts[0, m], starts[1, m], starts[2, m], 1)), np.float64)
    for f in range(3):
        for e in range(n):
            x0, y0 = px[e], py[e]
            x1, y1 = px[(e + 1) % n], py[(e + 1) % n]
            for q in range(q_lo[f, e], q_hi[f, e] + 1):
                y = (q + 0.5) / k - 0.5 + offs[f]
                xcross[f, fill[f, q - q_first]] = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
                fill[f, q - q_first] += 1
    # Spans of the current sub-row, in sub-sample columns (the three families overlap).
    span_a = np.empty(3 * n, np.int64)  # at most n // 2 spans per family
    span_b = np.empty(3 * n, np.int64)
    c_min, c_max = w, -1  # columns touched in the current pixel row
    for q in range(q_first, q_last + 1):
        r = q // k
        ns = 0
        for f in range(3):
            s, e_ = starts[f, q - q_first], starts[f, q - q_first + 1]
            if e_ - s < 2:
                continue
            row = xcross[f, s:e_]
            _insertion_sort(row)
            for i in range(0, len(row) - 1, 2):
                a = row[i] - grow[f]
                b = row[i + 1] + grow[f]
                t0 = max(math.ceil((a + 0.5) * k - 0.5), 0)
                t1 = min(math.floor((b + 0.5) * k - 0.5), w * k - 1)
                if t0 > t1:
                    continue
                if k == 1:  # one sample per pixel: spans are the mask itself
                    out[r, t0 : t1 + 1] = 1
                    continue
                span_a[ns], span_b[ns] = t0, t1
                ns += 1
        if ns > 0:
            last = _add_union(span_a, span_b, ns, k, out[r])
            c_min, c_max = min(c_min, span_a[0] // k), max(c_max, last // k)
        if k > 1 and (q % k == k - 1 or q == q_last):
            for col in range(c_min, c_max + 1):
                out[r, col] = lut[out[r, col]]
            c_min, c_max = w, -1


@numba.njit(cache=True, nogil=True)
def _add_union(a, b, n, k, out_row):  # pragma: no cover - compiled
    """Add to each pixel of ``out_row`` its sub-samples in the union of the n spans
    [a[i], b[i]] (sub-sample columns, k per pixel), sorting them; returns the union's
    last column. Per pixel rather than per sub-sample: a span adds its overlap with each
    pixel it touches (k for the pixels it covers)."""
    _sort_spans(a, b, n)
    last = b[0]
    lo, hi = a[0], b[0]
    for j in range(1, n + 1):
        if j < n and a[j] <= hi + 1:
            hi = max(hi, b[j])
            continue
        ca, cb = lo // k, hi // k
        if ca == cb:
            out_row[ca] += np.uint8(hi - lo + 1)
        else:
            out_row[ca] += np.uint8((ca + 1) * k - lo)
            out_row[ca + 1 : cb] += np.uint8(k)
            out_row[cb] += np.uint8(hi - cb * k + 1)
        last = max(last, hi)
        if j < n:
            lo, hi = a[j], b[j]
    return last


@numba.njit(cache=True, nogil=True)
def _sort_spans(a, b, n):  # pragma: no cover - compiled
    """Sort the first n spans (a[i], b[i]) by start, in place; a row has a handful."""
    for i in range(1, n):
        va, vb = a[i], b[i]
        j = i - 1
        while j >= 0 and a[j] > va:
            a[j + 1], b[j + 1] = a[j], b[j]
            j -= 1
        a[j + 1], b[j + 1] = va, vb


@numba.njit(cache=True, nogil=True)
def _insertion_sort(a):  # pragma: no cover - compiled
    """In-place sort; a scanline crosses a bone outline only a handful of times."""
    for i in range(1, len(a)):
        v = a[i]
        j = i - 1
        while j >= 0 and a[j] > v:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = v
