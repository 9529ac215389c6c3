"""Exact, sparse "bilinear upsample to (H, W), then sigmoid > threshold".

For each class c the result equals ``torch.sigmoid(F.interpolate(x[c], (H, W),
mode="bilinear", align_corners=False)) > t`` bit for bit (or ``F.interpolate(p) > t`` for
probabilities; ``bonecomp.testing.reference_masks``, the dense definition, says why per
class), but the full float maps are never made: bilinear interpolation is a convex
combination of the four neighbouring inputs, so only inputs near or above the threshold
can produce foreground. Per class we upsample just the bounding box of those inputs (plus
one pixel) and decide each output pixel there.

Exactness: values from a crop match the full upsample in exact arithmetic (crops are
aligned to the grid on which the output offset is an integer, and we use the same size
ratio), but torch's CPU kernel may round the last bit differently on narrow crops. So
pixels within a small tolerance of the threshold are "ambiguous" and are decided again
from a full-width band, which takes the same code path as the full upsample, with the
sigmoid evaluated on a padded, vector-aligned buffer as it is in the full tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bonecomp import rle

_REL_TOL = 2e-6  # > 16 float32 ulps: bound on crop-vs-full rounding, relative to max|x|


@dataclass
class SparseMask:
    """One class's mask at full size: zero outside ``crop`` placed at (y0, x0)."""

    y0: int
    x0: int
    crop: torch.Tensor  # bool (h, w), possibly (0, 0)

    @property
    def area(self) -> int:
        return int(self.crop.sum())


@dataclass
class SparseMasks:
    """The C masks of one image at full size, each stored as its bounding-box crop."""

    shape: tuple[int, int]
    masks: list[SparseMask]

    def __len__(self) -> int:
        return len(self.masks)

    def dense(self) -> torch.Tensor:
        """(C, H, W) bool on the crops' device (tests and plots; costly at 2048)."""
        dev = self.masks[0].crop.device if self.masks else "cpu"
        out = torch.zeros((len(self.masks), *self.shape), dtype=torch.bool, device=dev)
        for c, m in enumerate(self.masks):
            h, w = m.crop.shape
            out[c, m.y0 : m.y0 + h, m.x0 : m.x0 + w] = m.crop
        return out

    def runs(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """0-based run starts and lengths of class ``c`` in the full-size flat order."""
        m = self.masks[c]
        if m.crop.is_cuda:
            return _runs_torch(m.crop, m.y0, m.x0, self.shape)
        return rle.crop_to_runs(m.crop.numpy(), m.y0, m.x0, self.shape)

    def rle(self) -> list[str]:
        """One competition RLE string per class."""
        return [rle.runs_to_string(*self.runs(c)) for c in range(len(self.masks))]


def overlap_counts(
    pred: Sequence[SparseMask], truth: Sequence[tuple[int, int, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersection, |pred|, |truth|) per class, from crops only.

    ``truth[c]`` is (y0, x0, crop) as ``data.rasterize.class_crop`` gives it.
    """
    n = len(pred)
    inter, p_area, t_area = (np.zeros(n, np.int64) for _ in range(3))
    for c, (m, (ty, tx, t)) in enumerate(zip(pred, truth, strict=True)):
        t_area[c] = np.count_nonzero(t)
        if m.crop.numel() == 0:
            continue
        crop = m.crop.cpu().numpy()
        p_area[c] = np.count_nonzero(crop)
        y0, y1 = max(m.y0, ty), min(m.y0 + crop.shape[0], ty + t.shape[0])
        x0, x1 = max(m.x0, tx), min(m.x0 + crop.shape[1], tx + t.shape[1])
        if y1 > y0 and x1 > x0:
            a = crop[y0 - m.y0 : y1 - m.y0, x0 - m.x0 : x1 - m.x0]
            b = t[y0 - ty : y1 - ty, x0 - tx : x1 - tx]
            inter[c] = np.count_nonzero(a & (b != 0))
    return inter, p_area, t_area


def as_thresholds(thresholds: float | Sequence[float], num_classes: int) -> list[float]:
    """One threshold per class from a scalar or a sequence; each strictly in (0, 1)."""
    ts = [float(thresholds)] * num_classes if np.isscalar(thresholds) else list(thresholds)
    if len(ts) != num_classes:
        raise ValueError(f"{len(ts)} thresholds for {num_classes} classes")
    bad = [t for t in ts if not 0 < t < 1]
    if bad:
        raise ValueError(f"thresholds must be in (0, 1), got {bad}")
    return [float(t) for t in ts]


def upsample_threshold(
    x: torch.Tensor,
    out_hw: tuple[int, int],
    thresholds: float | Sequence[float] = 0.5,
    logits: bool = True,
) -> SparseMasks:
    """Masks of ``(sigmoid(up(x)) if logits else up(x)) > t`` for x of shape (C, h, w).

    ``up`` is bilinear, align_corners=False, in float32 (inputs are converted), on x's
    device. ``thresholds`` is one value or one per class.
    """
    if x.ndim != 3:
        raise ValueError(f"upsample_threshold: expected (C, h, w), got {tuple(x.shape)}")
    x = x.detach().float().contiguous()
    C, h, w = x.shape
    H, W = out_hw
    ts = as_thresholds(thresholds, C)
    gy, gx = h // math.gcd(h, H), w // math.gcd(w, W)  # grid with integer output offsets
    cuts = [_cuts(t, logits) for t in ts]
    flat = x.view(C, -1)
    scale = torch.maximum(flat.amax(dim=1), -flat.amin(dim=1)).add_(1).cpu().tolist()
    # Crops round like the full upsample only when the size ratios are exact in float32.
    inexact = 1 if _exact_ratio(h, H) and _exact_ratio(w, W) else max(h, w)
    tol = [_REL_TOL * s * inexact for s in scale]
    floor = torch.tensor(
        [lo - 2 * e for (lo, _), e in zip(cuts, tol, strict=True)], device=x.device
    )
    rows = (x.amax(dim=2) >= floor[:, None]).cpu().numpy()
    cols = (x.amax(dim=1) >= floor[:, None]).cpu().numpy()
    masks = []
    for c in range(C):
        if not rows[c].any():
            masks.append(_empty(x.device))
            continue
        i0, i1 = _span(rows[c])
        j0, j1 = _span(cols[c])
        a, b = _down(max(i0 - 1, 0), gy), _up(min(i1 + 2, h), gy)
        cs, ce = _down(max(j0 - 1, 0), gx), _up(min(j1 + 2, w), gx)
        v = _upsample(x[c, a:b, cs:ce], ((b - a) * H // h, (ce - cs) * W // w))
        # Small per-crop work runs in numpy on CPU: torch's thread pool only adds
        # overhead here (and spins badly when DataLoader workers compete for cores).
        on_cpu = not v.is_cuda
        v = v.numpy() if on_cpu else v
        y0, x0 = a * H // h, cs * W // w
        (lo, hi), e = cuts[c], tol[c]
        mask = v > hi + e
        amb = (v >= lo - e) & ~mask
        if amb.any():
            ys, xs = _nonzero(amb)
            ty, tx = (torch.as_tensor(i, device=x.device) for i in (ys, xs))
            decided = _decide(x[c], ty + y0, tx + x0, (H, W), ts[c], logits)
            mask[ys, xs] = decided.numpy() if on_cpu else decided
        masks.append(trim(mask, y0, x0))
    return SparseMasks((H, W), masks)


def upsampled_rows(xc: torch.Tensor, y0: int, y1: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """Rows ``[y0, y1)`` of ``F.interpolate(xc, out_hw)`` (bilinear, align_corners=False),
    full width, bit for bit, for one channel ``xc`` (h, w), without the full map: from a
    band taking the full upsample's code path. When the size ratio is not exact in float32
    the band must start at row 0 to round like the full upsample."""
    xc = xc.detach().float()
    h, w = xc.shape
    H, W = out_hw
    gy = h // math.gcd(h, H)
    if _exact_ratio(h, H) and _exact_ratio(w, W):
        a = _down(max(_src_row(y0, h, H) - 1, 0), gy)
    else:
        a = 0
    b = _up(min(_src_row(y1 - 1, h, H) + 3, h), gy)
    band = _upsample(xc[a:b], ((b - a) * H // h, W))
    return band[y0 - a * H // h : y1 - a * H // h]


def _cuts(t: float, logits: bool) -> tuple[float, float]:
    """Values below ``lo`` surely fall at or under the threshold, above ``hi`` surely over.

    For logits the cut is logit(t), widened by more than sigmoid's float32 rounding near t.
    """
    if not logits:
        return t, t
    ulp = float(np.spacing(np.float32(t)))
    delta = 16 * ulp / (t * (1 - t))
    cut = math.log(t / (1 - t))
    return cut - delta, cut + delta


def _decide(
    xc: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    out_hw: tuple[int, int],
    t: float,
    logits: bool,
) -> torch.Tensor:
    """Reference decisions at output pixels (ys, xs) of one class, from full-width bands
    (``upsampled_rows``). Ambiguous pixels are few; nearby rows share a band."""
    vals = torch.empty(len(ys), device=xc.device)
    order = torch.argsort(ys)
    ys_sorted = ys[order].cpu().numpy()
    breaks = np.flatnonzero(np.diff(ys_sorted) > 2) + 1
    for group in np.split(np.arange(len(ys_sorted)), breaks):
        y_min, y_max = int(ys_sorted[group[0]]), int(ys_sorted[group[-1]])
        band = upsampled_rows(xc, y_min, y_max + 1, out_hw)
        idx = order[torch.as_tensor(group, device=xc.device)]
        vals[idx] = band[ys[idx] - y_min, xs[idx]]
    if not logits:
        return vals > t
    n = vals.numel()
    padded = torch.zeros(max(64, -(-n // 64) * 64), device=vals.device)
    padded[:n] = vals
    return torch.sigmoid(padded)[:n] > t


def _src_row(y: int, h: int, H: int) -> int:
    """Input row below output row y in torch's mapping (align_corners=False)."""
    return math.floor(max((y + 0.5) * h / H - 0.5, 0.0))


def _exact_ratio(n: int, N: int) -> bool:
    """Do crops compute torch's source coordinates exactly, as the full upsample does?

    True when the scale n / N is a dyadic fraction and scale * (j + 0.5) stays exact in
    float32 (24-bit mantissa) for every output index j < N: e.g. any n < 4096 for N = 2048.
    """
    g = math.gcd(n, N)
    q = N // g
    return q & (q - 1) == 0 and (n // g) * 2 * N < 2**24


def _upsample(crop: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    out = F.interpolate(
        crop[None, None].contiguous(), size=size, mode="bilinear", align_corners=False
    )
    return out[0, 0]


def _runs_torch(
    crop: torch.Tensor, y0: int, x0: int, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Runs of a crop computed on its device (the CUDA path); only boundaries are copied."""
    h, w = crop.shape
    W = shape[1]
    if h == 0 or w == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    full_width = w == W
    grid = crop if full_width else F.pad(crop.to(torch.uint8), (0, 1)).bool()
    flat = grid.reshape(-1).to(torch.int8)
    edges = torch.diff(flat, prepend=flat.new_zeros(1), append=flat.new_zeros(1))
    pos = torch.nonzero(edges, as_tuple=True)[0].cpu().numpy().astype(np.int64)
    starts, ends = pos[0::2], pos[1::2]
    if full_width:
        return starts + y0 * W, ends - starts
    rows, cols = np.divmod(starts, w + 1)
    return (rows + y0) * W + cols + x0, ends - starts


def _span(flags: np.ndarray) -> tuple[int, int]:
    idx = np.flatnonzero(flags)
    return int(idx[0]), int(idx[-1])


def _down(v: int, g: int) -> int:
    return v // g * g


def _up(v: int, g: int) -> int:
    return -(-v // g) * g


def _empty(device: torch.device) -> SparseMask:
    return SparseMask(y0=0, x0=0, crop=torch.zeros((0, 0), dtype=torch.bool, device=device))


def _nonzero(a: np.ndarray | torch.Tensor) -> tuple:
    return torch.nonzero(a, as_tuple=True) if isinstance(a, torch.Tensor) else np.nonzero(a)


def trim(mask: np.ndarray | torch.Tensor, y0: int, x0: int) -> SparseMask:
    """A box-sized bool ``mask`` placed at (``y0``, ``x0``), cut to its bounding box as a
    ``SparseMask`` (numpy on CPU, torch on CUDA)."""
    (r,), (c,) = _nonzero(mask.any(1)), _nonzero(mask.any(0))
    if len(r) == 0:
        return _empty(mask.device if isinstance(mask, torch.Tensor) else "cpu")
    r0, r1, c0, c1 = int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1
    crop = mask[r0:r1, c0:c1]
    crop = crop.contiguous() if isinstance(crop, torch.Tensor) else torch.from_numpy(crop.copy())
    return SparseMask(y0 + r0, x0 + c0, crop)
