"""Ground-truth polygons of training images, keyed by relative path: the one reader of the
truth for threshold tuning, class-wise weights, the crop stage's OOF Dice, the overlays
and the report.

The polygons come from the training cache when a built, valid one is there
(``cache.find_cache``: the JSON was checked once on its way in and is not parsed again),
else from the annotation JSON at ``layout.annotation_path`` (the cache was deleted, is
stale, or the report runs on another machine). Both give the same points: the cache keeps
the JSON's integer points as they are. A crop cache holds each image's polygons shifted
into its box; shifting them back is exact, so the truth is always in the whole image's
frame, or in a box's frame when one is asked for::

    truth = GroundTruth.of(cfg.data)
    polys = truth.polygons("ID001/a.png")             # source frame
    polys = truth.polygons("ID001/a.png", box)        # a crop run's OOF frame
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bonecomp.config import DataConfig
from bonecomp.data.annotations import Polygons, load_annotation
from bonecomp.data.cache import TrainCache, find_cache
from bonecomp.data.carpal_box import Box, crop_polygons, index_boxes
from bonecomp.data.layout import annotation_path


class GroundTruth:
    """Truth polygons of one data root's training images: from ``cache`` where it holds
    the image, else from its annotation JSON."""

    def __init__(self, root: Path | str, cache: TrainCache | None = None) -> None:
        self.root = Path(root)
        self.cache = cache
        rels = cache.index["rel"] if cache is not None else []
        self._row = {rel: i for i, rel in enumerate(rels)}
        self._boxes = index_boxes(cache.index) if cache is not None else None

    @classmethod
    def of(cls, data: DataConfig) -> GroundTruth:
        """The truth of a config's data section: its training cache if built and valid,
        else the JSON under ``data.root``."""
        return cls(data.root, find_cache(data))

    @property
    def source(self) -> str:
        """Where the polygons come from, in words (for logs)."""
        if self.cache is not None:
            return f"cache {self.cache.dir}"
        return f"annotation JSON under {self.root}"

    def polygons(self, rel: str, box: Box | None = None) -> Polygons:
        """Image ``rel``'s 29 polygons in its source frame, or in ``box``'s frame; an
        unusable JSON is an ``AnnotationError`` naming the file."""
        i = self._row.get(rel)
        if i is None:
            polys = load_annotation(annotation_path(self.root, rel))
        else:
            polys = self.cache.polygons(i)  # type: ignore[union-attr]
            if self._boxes is not None:  # a crop cache: back from its box to the source frame
                y0, _, x0, _ = self._boxes[i]
                shift = np.array([x0, y0], np.int32)
                polys = Polygons(np.ascontiguousarray(polys.points + shift), polys.offsets)
        return polys if box is None else crop_polygons(polys, box)


def as_truth(truth: GroundTruth | Path | str) -> GroundTruth:
    """``truth`` itself, or for a data root the truth read from its annotation JSON."""
    return truth if isinstance(truth, GroundTruth) else GroundTruth(truth)
