"""Polygon maths for the phantom: directions, rotations, carving outlines apart, clipping,
resampling.

Pure numpy on ``(n, 2)`` float arrays; it knows nothing of hands, so every anatomical
constant (pivot, gap) is an argument.
"""

from __future__ import annotations

import numpy as np


def unit(degrees: float) -> np.ndarray:
    """Unit vector at ``degrees`` from +y, positive towards +x (the little finger)."""
    a = np.radians(degrees)
    return np.array([np.sin(a), np.cos(a)])


def turn(points: np.ndarray, degrees: float, pivot: np.ndarray) -> np.ndarray:
    """Rotate points clockwise (towards the little finger) by ``degrees`` about ``pivot``."""
    a = np.radians(degrees)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    return (points - pivot) @ rot.T + pivot


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1."""
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def ray_limit(
    origins: np.ndarray, points: np.ndarray, obstacles: list[np.ndarray], gap: float
) -> np.ndarray:
    """How far each point may reach from its origin and stay ``gap`` short of every obstacle.

    The ray from the origin through the point is cut where it first enters an obstacle.
    """
    origins = np.broadcast_to(origins, points.shape)
    rays = unit_rows(points - origins)
    lo, hi = points.min(0) - gap, points.max(0) + gap
    hit = np.full(len(points), np.inf)
    for obstacle in obstacles:
        if np.all(obstacle.max(0) >= lo) and np.all(obstacle.min(0) <= hi):
            hit = np.minimum(hit, ray_hits(origins, rays, obstacle))
    return hit - gap


def split_limit(
    points: np.ndarray,
    centre: np.ndarray,
    neighbours: list[tuple[np.ndarray, np.ndarray]],
    gap: float,
) -> np.ndarray:
    """How far each point may reach from ``centre`` and stay on this bone's side of the joint
    line with every neighbour.

    The joint line is perpendicular to the line between the two centres and divides it in
    proportion to the two bones' extents towards each other, so overlapping blobs give up
    room evenly; each bone keeps half the gap from it.
    """
    rays = unit_rows(points - centre)
    limit = np.full(len(points), np.inf)
    for other, other_centre in neighbours:
        axis = other_centre - centre
        distance = np.linalg.norm(axis)
        axis = axis / distance
        mine = np.max((points - centre) @ axis)
        theirs = np.max((other - other_centre) @ -axis)
        line = distance * mine / (mine + theirs) - gap / 2
        facing = rays @ axis
        with np.errstate(divide="ignore"):
            limit = np.minimum(limit, np.where(facing > 0, line / facing, np.inf))
    return limit


def carve(points: np.ndarray, origins: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Pull outline points back along their rays from ``origins`` to at most ``limit``.

    The cut depth is smoothed along the outline (never made shallower), so new facets meet
    the old outline with rounded shoulders.
    """
    rays = points - origins
    reach = np.linalg.norm(rays, axis=1)
    depth = np.maximum(reach - limit, 0)
    if not depth.any():
        return points
    smooth = np.convolve(np.concatenate([depth[-4:], depth, depth[:4]]), np.ones(9) / 9, "valid")
    depth = np.minimum(np.maximum(depth, smooth), 0.9 * reach)
    return origins + rays * ((reach - depth) / reach)[:, None]


def ray_hits(origins: np.ndarray, rays: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Distance along each ray to its first crossing of the polygon's edges (inf if none)."""
    a = polygon[None]
    edge = np.roll(polygon, -1, axis=0)[None] - a
    w = a - origins[:, None]
    u = rays[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = u[..., 0] * edge[..., 1] - u[..., 1] * edge[..., 0]
        t = (w[..., 0] * edge[..., 1] - w[..., 1] * edge[..., 0]) / denom
        s = (w[..., 0] * u[..., 1] - w[..., 1] * u[..., 0]) / denom
    valid = (t > 0) & (s >= 0) & (s <= 1)
    return np.where(valid, t, np.inf).min(axis=1)


def clip_to_square(points: np.ndarray, high: float) -> np.ndarray:
    """Sutherland-Hodgman clip of a closed polygon to the square [0, high]^2."""
    if points.min() >= 0 and points.max() <= high:
        return points
    poly = points
    for axis, limit, sign in ((0, 0.0, 1), (0, high, -1), (1, 0.0, 1), (1, high, -1)):
        inside = sign * (poly[:, axis] - limit)  # >= 0 inside
        nxt = np.roll(poly, -1, axis=0)
        inside_next = np.roll(inside, -1)
        crossing = (inside >= 0) != (inside_next >= 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(crossing, inside / (inside - inside_next), 0.0)
        cut = poly + t[:, None] * (nxt - poly)
        candidates = np.stack([poly, cut], axis=1)
        keep = np.column_stack([inside >= 0, crossing])
        poly = candidates[keep]
        if len(poly) < 3:
            raise RuntimeError("a bone lies outside the image")
    return poly


def perimeter(poly: np.ndarray) -> float:
    """Length of a closed polygon's outline."""
    return float(np.linalg.norm(np.roll(poly, -1, axis=0) - poly, axis=1).sum())


def resample(poly: np.ndarray, n: int) -> np.ndarray:
    """``n`` points evenly spaced along a closed polygon's outline."""
    closed = np.vstack([poly, poly[:1]])
    step = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    keep = np.concatenate([[True], step > 1e-9])
    closed = closed[keep]
    along = np.concatenate([[0.0], np.cumsum(step[step > 1e-9])])
    target = np.arange(n) * along[-1] / n
    return np.column_stack([np.interp(target, along, closed[:, i]) for i in range(2)])
