"""Training cache: every image at the training resolution plus its polygons, built once.

    cache_dir/train_<size>/          (or train_<size>_carpal-m<margin>/, see below;
                                     + _<label> with data.preprocess, e.g. _clahe-2-8)
        images.npy    (N, S, S) uint8 grey images (INTER_AREA from the PNG, after the
                      data.preprocess steps applied to the PNG at its source size)
        crc.npy       (N,) uint32 zlib.crc32 of each image row, checked on every read
        points.npy    (M, 2) int32 all polygon points; offsets.npy (N, C+1) int64 into it
        index.csv     rel, patient, name, src_h, src_w
        manifest.json version, size, fingerprint of the sources, byte size + hash per file

Masks are not stored: the Dataset draws them from the cached polygons at any pose
(``rasterize``, exact: as fast as unpacking 29 bit-packed planes at 512 px, 2.7x faster
at 2048). The big array is memory-mapped, so DataLoader workers share the page cache.
The cache is reused while the sources' (size, mtime), the resolution and the
preprocessing (``data.preprocess``: its steps and parameters are in the folder name and
the fingerprint, so a cache built without CLAHE never serves a CLAHE run) match, and
rebuilt otherwise; ``data_cache_dir`` keeps one data root's caches apart from another's.
A cache's identity (size, ``on_bad_image``, crop margin, preprocessing) is one
``CacheSpec``, made from the config (``CacheSpec.from_config``): the folder name and the
fingerprint come from it alone, and every function that builds, names, opens or checks a
cache takes it.
It is built in a temporary folder and moved into place whole, with the manifest written
last, so a crash never leaves a cache that loads as valid.

A crop cache (``crop_margin`` set: ``data.crop: carpal``) holds each image's carpal box
(``data.carpal_box.truth_box``: the eight carpal polygons' square box plus the margin) cut
from the full-resolution PNG and resized to ``S``; its polygons are shifted into the
box's frame and ``src_h, src_w`` are the box's size, so the Dataset, augmentations and
validation work on crops unchanged. ``index.csv`` adds the box (``box_y0 .. box_x1``).

Failures while building: a training image whose PNG or JSON is unusable (undecodable,
bad JSON, unknown label, points outside the PNG's frame, e.g. a 1024 px PNG annotated in
the 2048 frame) stops the build with one line naming both files and the PNG's size, or,
with ``on_bad_image="skip"``, is left out with a warning. Free disk is checked against the
cache's size before writing and the images file is preallocated, so a full disk ends in
one ``CacheError`` naming the folder, never a SIGBUS. Any failure removes the partial
cache and ends the workers; a worker whose parent was killed (kill -9) ends within a
second, even mid-image (``bonecomp.workers``), and the next ``open_cache`` removes the
temporary folder the dead builder left.

Damage: opening checks every file's size, the small files' hashes and the .npy headers
(hashing GBs of images on every open would be slow; ``verify=True`` does it). Damage
inside images.npy is caught when the row is read: its crc32 must match, else
``CacheError`` is raised and the folder is marked damaged, so the next ``open_cache``
rebuilds it (about 0.04 ms per image at 512 px, 1 ms at 2048: 1-3% of a loader step).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bonecomp.classes import NUM_CLASSES
from bonecomp.config import Config, DataConfig, OnBadImage
from bonecomp.data.annotations import AnnotationError, Polygons, load_annotation
from bonecomp.data.carpal_box import BOX_COLUMNS, crop_image, crop_polygons, truth_box
from bonecomp.data.images import ImageReadError, read_image
from bonecomp.data.layout import discover
from bonecomp.data.preprocess import NONE, Preprocess
from bonecomp.extensions import import_extensions
from bonecomp.fileio import file_hash, preallocate, remove_stale_temps, replace_dir
from bonecomp.workers import end_with_parent, spawn_context

CACHE_VERSION = 2  # 2: no masks.npy; per-image crc32 in crc.npy
_ARRAYS = ("images.npy", "crc.npy", "points.npy", "offsets.npy")
_BIG = ("images.npy",)  # hashed on open only with verify=True
_DAMAGED = "DAMAGED"  # marker written when a read finds damage: the next open rebuilds
ON_BAD_IMAGE: tuple[str, ...] = get_args(OnBadImage)  # of an unusable training image


class CacheError(RuntimeError):
    """A cache that cannot be used; the message says why."""


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds besides its sources: the one identity of a cache. Its folder
    name and its fingerprint come from here only, so training, the doctor and the readers
    of the truth (``find_cache``) always name the same folder for a recipe.

    ``crop_margin``: a carpal crop cache with this margin (None: whole images).
    ``preprocess``: the ``data.preprocess`` steps, applied to each PNG before it is cut
    and resized. ``on_bad_image``: "error" stops at an unusable training image, "skip"
    leaves it out (in the fingerprint, not the name: such a cache may lack images).
    """

    size: int
    on_bad_image: OnBadImage = "error"
    crop_margin: float | None = None
    preprocess: Preprocess = NONE

    def __post_init__(self) -> None:
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(
                f"on_bad_image must be one of {ON_BAD_IMAGE}, got {self.on_bad_image!r}"
            )

    @classmethod
    def from_config(cls, cfg: Config | DataConfig) -> CacheSpec:
        """The cache a config's ``data`` section trains on (a whole ``Config`` or its
        ``data``)."""
        data = cfg.data if isinstance(cfg, Config) else cfg
        return cls(
            size=data.image_size,
            on_bad_image=data.on_bad_image,
            crop_margin=data.crop_margin if data.crop else None,  # carpal: carpal boxes
            preprocess=Preprocess.of(data),
        )

    @property
    def dirname(self) -> str:
        """The cache folder's name: ``train_<size>``, or ``train_<size>_carpal-m<margin>``,
        then ``_<preprocess label>`` when there is preprocessing (``train_512_clahe-2-8``)."""
        size, margin = self.size, self.crop_margin
        name = f"train_{size}" if margin is None else f"train_{size}_carpal-m{margin:g}"
        return f"{name}_{self.preprocess.label}" if self.preprocess else name

    @property
    def key(self) -> str:
        """The spec's part of the source fingerprint: the cache version, the resolution,
        and ``on_bad_image`` when it is "skip", the crop and the preprocessing when set
        (unchanged from before the spec, so existing caches are reused)."""
        extra = "" if self.on_bad_image == "error" else f" on_bad_image={self.on_bad_image}"
        margin, prep = self.crop_margin, self.preprocess
        extra += "" if margin is None else f" crop=carpal margin={margin!r}"
        extra += f" preprocess={prep.label}" if prep else ""
        return f"v{CACHE_VERSION} size={self.size}{extra}"


@dataclass
class TrainCache:
    """Read access to a built cache; arrays are memory-mapped."""

    dir: Path
    size: int
    index: pd.DataFrame
    images: np.ndarray
    crc: np.ndarray
    points: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int, copy: bool = True) -> np.ndarray:
        """(S, S) uint8 checked against its build-time crc32: a writable copy, or with
        ``copy=False`` the read-only memory-mapped row (a patch warps only its window)."""
        img = np.array(self.images[i]) if copy else self.images[i]
        if zlib.crc32(img) != int(self.crc[i]):
            raise self.damaged(f"image row {i} ({self.index['rel'].iloc[i]}) fails its checksum")
        return img

    def damaged(self, reason: str) -> CacheError:
        """Mark the cache damaged (the next ``open_cache`` rebuilds it); the error to raise."""
        with contextlib.suppress(OSError):  # read-only folder: the error still says it all
            (self.dir / _DAMAGED).write_text(reason + "\n")
        return CacheError(
            f"cache {self.dir} is damaged: {reason}; it is marked so, and the next run rebuilds it"
        )

    def polygons(self, i: int) -> Polygons:
        off = np.asarray(self.offsets[i])
        return Polygons(np.asarray(self.points[off[0] : off[-1]]), off - off[0])

    def src_hw(self, i: int) -> tuple[int, int]:
        row = self.index.iloc[i]
        return int(row["src_h"]), int(row["src_w"])


def open_cache(
    df: pd.DataFrame,
    cache_dir: Path | str,
    spec: CacheSpec,
    workers: int | None = None,
    progress: bool = True,
    verify: bool = False,
) -> TrainCache:
    """The cache ``spec`` of ``df`` (a training table from ``layout.discover``), in
    ``cache_dir/<spec.dirname>``.

    Loads it when valid for these sources and this spec, else (re)builds it. A lock
    file serialises jobs sharing the folder; under it, the temporary folders of builders
    that died (kill -9) are removed. In a read-only folder (a shared mount) a complete
    cache is used without a lock; an incomplete one is a ``CacheError``. ``verify``
    re-hashes the big arrays too (seconds per GB); by default their sizes and headers are
    checked.
    """
    folder = Path(cache_dir) / spec.dirname
    with _locked(folder.with_name(f".{folder.name}.lock")) as locked:
        if not locked:  # a read-only folder: nothing can be built or cleaned there
            return _read_only_cache(df, folder, spec)
        for stale in remove_stale_temps(folder.parent):
            print(f"cache: cleaned up {stale}, left by a build that was killed", file=sys.stderr)
        fingerprint = source_fingerprint(df, spec)
        problem = check_cache(folder, fingerprint, verify)
        if problem is not None:
            if folder.exists():
                print(f"cache {folder}: {problem}; rebuilding")
            build_cache(df, folder, spec, fingerprint, workers=workers, progress=progress)
        return load_cache(folder)


def find_cache(data: DataConfig) -> TrainCache | None:
    """The built training cache of a ``data`` section (the folder training opens), when
    it is complete and matches the current sources; None otherwise. Never builds, never
    waits for a builder: readers of the truth fall back to the JSON instead."""
    spec = CacheSpec.from_config(data)
    folder = cache_folder(data)
    if not (folder / "manifest.json").is_file():
        return None
    try:
        fingerprint = source_fingerprint(discover(data.root, "train", data.exclude), spec)
    except OSError:  # the data root moved or is incomplete (DataLayoutError is one)
        return None
    if check_cache(folder, fingerprint) is not None:
        return None
    try:
        return load_cache(folder)
    except (OSError, ValueError, KeyError):  # replaced or damaged since the check
        return None


def cache_folder(data: DataConfig) -> Path:
    """The folder training builds and opens for a ``data`` section (``open_cache`` of
    ``data_cache_dir`` and ``CacheSpec.from_config``): what the doctor and ``find_cache``
    look at."""
    return data_cache_dir(data.cache_dir, data.root) / CacheSpec.from_config(data).dirname


def data_cache_dir(cache_dir: Path | str, root: Path | str) -> Path:
    """The part of ``cache_dir`` that belongs to one data root (phantom and real data
    never share a cache or a folds file): ``cache_dir/<root name>-<hash of its path>``."""
    resolved = Path(root).resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    return Path(cache_dir) / f"{resolved.name}-{digest}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """An exclusive advisory lock on ``path`` (POSIX; a no-op where fcntl is missing);
    yields False, holding nothing, when its folder is read-only (no one can write there,
    so there is nothing to serialise)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield True
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        yield False
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_only_cache(df: pd.DataFrame, folder: Path, spec: CacheSpec) -> TrainCache:
    """The cache in a folder that cannot be written (a shared or input mount): used as it
    is when complete for these sources, else one ``CacheError`` saying why it cannot be
    built there and what to do."""
    problem = check_cache(folder, source_fingerprint(df, spec))
    if problem is None:
        return load_cache(folder)
    raise CacheError(
        f"cache {folder}: {problem}, and {folder.parent} is read-only, so it cannot be "
        "built there; set data.cache_dir to a writable folder"
    )


def source_fingerprint(df: pd.DataFrame, spec: CacheSpec) -> str:
    """Hash of the sources' paths, sizes and mtimes and of the spec (``CacheSpec.key``)."""
    h = hashlib.sha256(spec.key.encode())
    for rel, img, js in zip(df["rel"], df["image_path"], df["json_path"], strict=True):
        si, sj = os.stat(img), os.stat(js)
        h.update(f"|{rel}:{si.st_size}:{si.st_mtime_ns}:{sj.st_size}:{sj.st_mtime_ns}".encode())
    return h.hexdigest()


def check_cache(folder: Path, fingerprint: str, verify: bool = False) -> str | None:
    """None when the cache in ``folder`` is complete and matches; else the reason it is not.

    Small files are always hashed; the big arrays are checked by size and .npy header,
    or hashed too with ``verify``.
    """
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return "no manifest (never built or interrupted)"
    if (folder / _DAMAGED).exists():
        return f"marked damaged ({(folder / _DAMAGED).read_text(errors='replace').strip()})"
    try:
        meta = json.loads(manifest.read_text())
        files = {n: (int(info["bytes"]), str(info["hash"])) for n, info in meta["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "unreadable or malformed manifest"
    if meta.get("version") != CACHE_VERSION:
        return f"cache version {meta.get('version')} != {CACHE_VERSION}"
    if meta.get("fingerprint") != fingerprint:
        return "source files or resolution changed"
    if set(files) != {*_ARRAYS, "index.csv"}:
        return "manifest lists the wrong files"
    for name, (size, digest) in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} missing or truncated"
        big = name in _BIG
        if big and not verify:
            try:
                np.load(path, mmap_mode="r")  # header and size agree
            except ValueError:
                return f"{name} has a damaged header"
        elif file_hash(path) != digest:
            return f"{name} is corrupt (hash mismatch)"
    return None


def content_digest(folder: Path | str) -> str:
    """A hash of what a built cache holds (its files' hashes, size, version, crop and
    preprocessing), the same on every machine that built it from the same data, unlike
    the source fingerprint (which holds paths and mtimes): nodes of a torchrun job
    compare it."""
    meta = json.loads((Path(folder) / "manifest.json").read_text())
    files = sorted((name, info["hash"]) for name, info in meta["files"].items())
    what = [meta["version"], meta["size"], meta.get("crop_margin"), files]
    if meta.get("preprocess"):  # absent or "" in caches without preprocessing
        what.append(meta["preprocess"])
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def load_cache(folder: Path) -> TrainCache:
    meta = json.loads((folder / "manifest.json").read_text())
    index = pd.read_csv(folder / "index.csv", dtype={"rel": str, "patient": str, "name": str})
    arr = {n: np.load(folder / n, mmap_mode="r") for n in _ARRAYS}
    return TrainCache(
        folder,
        meta["size"],
        index,
        arr["images.npy"],
        arr["crc.npy"],
        arr["points.npy"],
        arr["offsets.npy"],
    )


def build_cache(
    df: pd.DataFrame,
    folder: Path,
    spec: CacheSpec,
    fingerprint: str,
    workers: int | None = None,
    progress: bool = True,
) -> None:
    """Build the cache ``spec`` into a temporary folder, then move it into place whole.

    Any failure (a bad training image with ``on_bad_image="error"``, a full disk, an
    interrupt) removes the temporary folder and ends the workers before it propagates.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(folder, len(df), spec.size)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _build_into(tmp, df, spec, fingerprint, workers, progress)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves nothing behind
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise CacheError(
                f"cache {folder}: the disk is full ({e.strerror}); the partial cache was "
                f"removed. Free {_gb(_cache_bytes(len(df), spec.size))} in {folder.parent} "
                "or set data.cache_dir to a disk with room"
            ) from e
        raise
    replace_dir(tmp, folder)


_IMAGES_PER_WORKER = 32


def _build_into(
    tmp: Path,
    df: pd.DataFrame,
    spec: CacheSpec,
    fingerprint: str,
    workers: int | None,
    progress: bool,
) -> None:
    """Write every file of the cache into ``tmp``; the workers are ended before it returns
    or raises."""
    size, preprocess = spec.size, spec.preprocess
    n = len(df)
    images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (n, size, size))
    preallocate(tmp / "images.npy")  # a full disk fails here, not as a SIGBUS mid-write
    crc = np.zeros(n, np.uint32)
    polys: list[Polygons] = []
    src_hw: list[tuple[int, int]] = []
    boxes: list[tuple[int, int, int, int]] = []
    kept: list[int] = []
    skipped: list[str] = []
    jobs = [(img, js, spec) for img, js in zip(df["image_path"], df["json_path"], strict=True)]
    if not workers:  # a spawned worker costs ~1.5 s of CPU to start (imports), an image
        # ~0.04 s at 2048 px (2026-12-07, 2 cores): below ~32 images each it costs more
        workers = min(os.cpu_count() or 1, n // _IMAGES_PER_WORKER)
    workers = max(1, min(workers, n))
    pool = None
    with tqdm(total=n, desc=f"cache {size}px", unit="img", disable=not progress) as bar:
        if workers == 1:
            results = map(_cache_item, jobs)
        else:
            pool = ProcessPoolExecutor(  # ends with us, also while it imports
                workers,
                spawn_context(),
                initializer=_worker_init,
                initargs=(os.getpid(), preprocess.modules),
            )
            results = pool.map(_cache_item, jobs, chunksize=4)
        try:
            for i, result in enumerate(results):
                bar.update()
                if isinstance(result, str):  # the problem of an unusable image
                    if spec.on_bad_image == "error":
                        raise CacheError(
                            f"{result}; run `python scripts/verify_data.py {_data_root(df)}` "
                            "to list every problem (or set data.on_bad_image=skip)"
                        )
                    print(f"warning: skipping a training image: {result}", file=sys.stderr)
                    skipped.append(result)
                    continue
                img, img_crc, poly, hw, box = result
                images[len(kept)], crc[len(kept)] = img, img_crc
                kept.append(i)
                polys.append(poly)
                src_hw.append(hw)
                boxes.append(box)
        except BaseException:
            if pool is not None:
                _end_workers(pool)
            raise
        if pool is not None:
            pool.shutdown()
    if not kept:
        raise CacheError(f"cache {tmp.parent}: every training image was skipped as unusable")
    images.flush()
    del images
    n = len(kept)
    if n < len(df):  # drop the skipped rows' room: rewrite the first n rows
        full = np.load(tmp / "images.npy", mmap_mode="r")
        np.save(tmp / "images.kept.npy", full[:n])
        del full
        os.replace(tmp / "images.kept.npy", tmp / "images.npy")
    np.save(tmp / "crc.npy", crc[:n])
    counts = np.array([p.offsets for p in polys], np.int64).reshape(n, NUM_CLASSES + 1)
    starts = np.concatenate([[0], np.cumsum(counts[:, -1])[:-1]])
    np.save(tmp / "offsets.npy", counts + starts[:, None])
    np.save(tmp / "points.npy", np.concatenate([p.points for p in polys]))
    index = df[["rel", "patient", "name"]].iloc[kept].copy()
    index["src_h"], index["src_w"] = zip(*src_hw, strict=True)
    if spec.crop_margin is not None:
        for col, values in zip(BOX_COLUMNS, zip(*boxes, strict=True), strict=True):
            index[col] = values
    index.to_csv(tmp / "index.csv", index=False)
    files = {
        name: {"bytes": (tmp / name).stat().st_size, "hash": file_hash(tmp / name)}
        for name in (*_ARRAYS, "index.csv")
    }
    meta = {"version": CACHE_VERSION, "size": size, "fingerprint": fingerprint, "n": n}
    meta["crop_margin"] = spec.crop_margin
    meta["preprocess"] = preprocess.label
    meta["skipped"] = skipped
    (tmp / "manifest.json").write_text(json.dumps({**meta, "files": files}, indent=1))


def check_free_space(folder: Path, n: int, size: int) -> None:
    """Raise ``CacheError`` (how much is needed, where) when the disk holding ``folder``
    cannot take a cache of ``n`` images at ``size``."""
    need = _cache_bytes(n, size)
    free = _free_bytes(folder.parent)
    if free < need:
        raise CacheError(
            f"cache {folder}: needs {_gb(need)} for {n} images at {size} px, but only "
            f"{_gb(free)} is free in {folder.parent}; free space there or set "
            "data.cache_dir to a disk with room"
        )


def _cache_bytes(n: int, size: int) -> int:
    return n * bytes_per_image(size) + (1 << 20)  # + headers, index, manifest


def _free_bytes(path: Path) -> int:
    """Free bytes on the disk holding ``path`` (a function of its own: tests patch it)."""
    return shutil.disk_usage(path).free


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _end_workers(pool: ProcessPoolExecutor) -> None:
    """Stop a pool after an error: cancel the queued work and wait for the chunks in
    flight (a few images per worker). The workers are not killed: one terminated while it
    writes its result leaves half a message in the result pipe, and the pool's manager
    thread then waits for the rest forever (the build hung in CI). A killed parent still
    ends them (``_worker_init``)."""
    pool.shutdown(wait=True, cancel_futures=True)


def _data_root(df: pd.DataFrame) -> Path:
    """The data root of a training table (``<root>/train/DCM/<rel>``)."""
    first = Path(df["image_path"].iloc[0])
    return first.parents[len(Path(df["rel"].iloc[0]).parts) + 1]


def _worker_init(parent: int, modules: tuple[str, ...] = ()) -> None:
    end_with_parent(parent)  # killed with its parent, even mid-image (bonecomp.workers)
    import_extensions(modules)  # a spawned process: the user's preprocessing steps
    # One thread per process: the pool's workers (at most one per core) are the parallelism.
    cv2.setNumThreads(1)
    import numba

    numba.set_num_threads(1)


def _cache_item(job: tuple[str, str, CacheSpec]) -> tuple | str:
    """One training image at ``size`` with its polygons, source size and box (the whole
    image, or with a crop margin the carpal box, to which image, polygons and size are
    cut; ``data.preprocess`` is applied to the whole PNG first), or, when the PNG or JSON
    is unusable, the problem as one line naming both files and the PNG's size."""
    image_path, json_path, spec = job
    try:
        img = read_image(image_path)
        hw = img.shape[:2]
        polys = load_annotation(json_path, hw)  # checked once: labels, points, PNG's frame
    except ImageReadError as e:
        return str(e)
    except AnnotationError as e:
        if not e.problems:  # the JSON did not read
            return str(e)
        more = f" (+{len(e.problems) - 2} more)" if len(e.problems) > 2 else ""
        return (
            f"{json_path}: " + "; ".join(e.problems[:2]) + more
            + f" (its image {image_path} is {hw[1]}x{hw[0]} px)"
        )  # fmt: skip
    img = spec.preprocess(img)  # at the source size, as at inference (data.preprocess)
    box = (0, hw[0], 0, hw[1])
    if spec.crop_margin is not None:
        box = truth_box(polys, hw, spec.crop_margin)
        polys, hw = crop_polygons(polys, box), (box[1] - box[0], box[3] - box[2])
    small = crop_image(img, box, spec.size)
    return small, zlib.crc32(small), polys, hw, box


def bytes_per_image(size: int) -> int:
    """Bytes one training image takes in the cache at ``size``: the (S, S) uint8 image,
    its crc32 and class offsets, and about 20 KB of polygon points and index row (the
    phantom's 17 KB of points, rounded up for denser real outlines).

    The one place that knows the cache's per-image footprint (``scripts/doctor.py`` checks
    free disk with it): change it here if the cache's arrays change.
    """
    return size * size + 4 + 8 * (NUM_CLASSES + 1) + 20_000
