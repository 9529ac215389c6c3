"""Atomic file writes: a crash never leaves a torn file under a final name.

Every file the pipeline writes for the next stage (checkpoints, thresholds, folds,
configs, CSVs) goes through ``atomic_write``: the content is written to a hidden
temporary file beside the target (``.<name>.tmp-<pid>``), flushed to disk and renamed
over the target. The pid in the name lets a later run find and remove the leftovers of a
process that died (``remove_stale_temps``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_TMP = re.compile(r"^\..+\.tmp-(\d+)$")


def temp_path(path: Path | str) -> Path:
    """The temporary name ``atomic_write`` uses for ``path`` in this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: Path | str, mode: str = "w", **open_kw) -> Iterator[IO]:
    """Open a temporary file for writing; on success fsync it and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path | str, text: str) -> Path:
    """``Path.write_text``, atomically."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def pid_alive(pid: int) -> bool:
    """Does process ``pid`` exist on this machine?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: Path | str) -> list[Path]:
    """Remove the ``atomic_write`` leftovers of dead processes in ``folder``; return them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed
