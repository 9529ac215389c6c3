"""Atomic file writes: a crash never leaves a torn file under a final name.

Every file the pipeline writes for the next stage (checkpoints, thresholds, folds,
configs, CSVs) goes through ``atomic_write``: the content is written to a hidden
temporary file beside the target (``.<name>.tmp-<pid>``), flushed to disk and renamed
over the target. The pid in the name lets a later run find and remove the leftovers of a
process that died (``remove_stale_temps``). Whole folders (the cache, pseudo-labels) are
built under such a temporary name and moved into place by ``replace_dir``.

A folder the pipeline cannot write to (read-only, no permission, disk full) is reported
in one place, ``output_errors``: an ``OutputError`` naming the folder and the cause.

The JSON files the pipeline reads back (annotations, thresholds files) are parsed by
``loads_json``, which refuses a key given twice in one object (``json`` keeps the last
silently).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_TMP = re.compile(r"^\.(.+)\.(tmp|old)-(\d+)$")

# errno -> what the user is told about the folder.
_CAUSES = {
    errno.EROFS: "the folder is on a read-only file system",
    errno.EACCES: "the folder is read-only (no permission to write there)",
    errno.EPERM: "the folder is read-only (no permission to write there)",
    errno.ENOSPC: "the folder is on a full disk (no space left)",
    errno.EDQUOT: "the folder is on a full disk (disk quota exceeded)",
    errno.EFBIG: "the file would pass this process's file size limit (ulimit -f) or the "
    "file system's; raise the limit (ulimit -f unlimited)",
}
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # the disk cannot take the bytes


class OutputError(Exception):
    """An output folder that cannot be written; the message names it and the cause."""


@contextlib.contextmanager
def output_errors(path: Path | str) -> Iterator[None]:
    """Turn 'read-only' and 'disk full' ``OSError``s raised while writing the file ``path``
    (or making its folder) into one ``OutputError`` naming the folder; others pass."""
    try:
        yield
    except OSError as e:
        if e.errno not in _CAUSES:
            raise
        path = Path(path)
        fix = "" if e.errno == errno.EFBIG else "free space or fix its permissions, "
        raise OutputError(
            f"cannot write {path.name} in {path.parent}: {_CAUSES[e.errno]}; "
            f"{fix}or write elsewhere"
        ) from e


def temp_path(path: Path | str) -> Path:
    """The temporary name ``atomic_write`` uses for ``path`` in this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: Path | str, mode: str = "w", **open_kw) -> Iterator[IO]:
    """Open a temporary file for writing; on success fsync it and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was; a
    read-only folder or a full disk raises ``OutputError`` naming the folder.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = temp_path(path)
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            f = open(tmp, mode, **open_kw)  # noqa: SIM115 - closed below, even on errors
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
                f.close()
            except BaseException:
                with contextlib.suppress(OSError):  # a full disk fails the close's flush too
                    f.close()
                raise
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_text(path: Path | str, text: str) -> Path:
    """``Path.write_text``, atomically."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def loads_json(text: str) -> Any:
    """``json.loads`` that raises ``ValueError`` for an object giving a key twice (where
    ``json`` silently keeps the last: a second ``"thresholds"`` or ``"points"`` would
    replace the first unseen)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} is given twice in one object (JSON keeps only the last)")
        out[k] = v
    return out


def file_hash(path: Path | str, chunk: int = 1 << 24) -> str:
    """blake2b-128 hex digest of a file, read in chunks (the manifests' file hashes)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def preallocate(path: Path | str) -> None:
    """Reserve ``path``'s blocks now, so running out of disk raises ``OSError`` here
    rather than a SIGBUS when a page of the memory map is first written."""
    fd = os.open(path, os.O_RDWR)
    try:
        reserve(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def reserve(fd: int, nbytes: int) -> None:
    """Reserve the first ``nbytes`` of the open file ``fd`` on its disk before they are
    written (a memory map, a checkpoint): a disk that cannot take them raises ``OSError``
    (ENOSPC, EDQUOT; EFBIG past ``ulimit -f``) now, never a SIGBUS or a torn write later.
    Where the file system cannot preallocate, its free space is checked instead."""
    if nbytes <= 0:
        return
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, nbytes)
            return
        except OSError as e:
            if e.errno in _FULL:
                raise
    if not hasattr(os, "fstatvfs"):
        return
    have = getattr(os.fstat(fd), "st_blocks", 0) * 512  # no fallocate: the free space
    vfs = os.fstatvfs(fd)
    if vfs.f_bavail * vfs.f_frsize < nbytes - have:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def pid_alive(pid: int) -> bool:
    """Does process ``pid`` exist on this machine?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def replace_dir(new: Path | str, dest: Path | str) -> None:
    """Move the finished folder ``new`` to ``dest`` whole, replacing the folder there.

    Two renames (``dest`` to ``.<name>.old-<pid>``, ``new`` to ``dest``), then the old
    folder is removed. A process killed between the renames leaves no ``dest`` but the
    old folder, which ``remove_stale_temps`` puts back.
    """
    new, dest = Path(new), Path(dest)
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(folder: Path | str) -> list[Path]:
    """Clear the leftovers of dead processes in ``folder`` and return them: temporary
    files and folders are removed; a folder ``replace_dir`` had moved aside goes back to
    its name when nothing took its place, else it is removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if not m or int(m.group(3)) == os.getpid() or pid_alive(int(m.group(3))):
            continue
        dest = p.with_name(m.group(1))
        if m.group(2) == "old" and not dest.exists():
            os.replace(p, dest)  # killed between replace_dir's renames: the old one is back
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
