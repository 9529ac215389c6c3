"""Worker processes end with their parent: the one helper every worker kind calls first.

Four kinds of worker run our code: the cache builder's pool (``data/cache.py``), the
phantom writer's pool (``data/phantom/write.py``), training DataLoader workers
(``training/data.py``) and inference DataLoader workers (``inference/predict.py``). A
parent killed with SIGKILL tells none of them: a pool worker waits on its queue for
good, and a worker busy in a long call that holds the GIL (a 2048 px decode and resize,
a numba raster) runs it to the end, since no thread of its own (a ``getppid`` poller,
torch's watchdog) can run meanwhile. So each worker calls ``end_with_parent`` at start:

* Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the worker the moment
  its parent dies, whatever the worker is doing. SIGKILL, not SIGTERM: a worker forked
  from a parent that installed a Python SIGTERM handler inherits it, and a Python handler
  only runs between bytecodes (never during the long C call) and need not exit at all;
  the worker holds nothing worth saving (its results were for the dead parent; files are
  written through ``fileio.atomic_write`` temporaries that the next run removes). Then
  ``getppid`` is checked once more: a parent that died before ``prctl`` sends nothing.
* Elsewhere (or when libc's ``prctl`` cannot be called): a daemon thread polls
  ``getppid`` (within ~0.2 s while the worker releases the GIL; after a GIL-holding call
  returns otherwise).

The caveat of PDEATHSIG: it fires when the parent *thread* that created the worker ends,
not only the parent process. So the thread that starts workers must outlive them, and in
this project it does: ``ProcessPoolExecutor`` (Python 3.11, spawn) starts its workers in
``submit``, in the calling thread (its manager thread starts replacements only with
``max_tasks_per_child``, which we never set), and both pools live inside one call of
that thread; a DataLoader forks its workers in the thread that calls ``iter`` on it (the
main thread: the training loop and inference run there; persistent workers too are
forked on the first epoch's ``iter``). Helper threads (pin-memory, tqdm's monitor, the
weights download) create no process, so their ending never takes a worker with it. Do
not iterate a DataLoader first in a short-lived thread.

A spawn worker runs Python code long before any initializer: the new interpreter
unpickles its start-up data, imports the parent's main module (a script importing torch)
and the modules of the initializer and of the work, seconds on a loaded machine, during
which it would outlive a killed parent. So the spawn pools use ``spawn_context()``: its
processes carry a name whose unpickling, the first thing the new interpreter does with
its parent's data, arms the signal (``bonecomp.workers`` is light: ctypes and the
standard library), before every import.

The multiprocessing resource tracker (a spawn pool's helper process) needs no call: it
exits when its pipe closes, that is when the parent and every worker are gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from multiprocessing.context import SpawnContext, SpawnProcess

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent(parent: int) -> None:
    """Make this worker process end within a second of ``parent``'s death (its pid, taken
    in the parent: after the parent's death ``getppid`` names another process)."""
    if not _set_pdeathsig(signal.SIGKILL):
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # died before the signal was armed (or while starting)
        os._exit(1)


def spawn_context() -> SpawnContext:
    """A spawn context (for ``ProcessPoolExecutor``) whose worker processes end with this
    process from their first instruction on, including while they import (see above)."""
    return _ArmedSpawnContext()


class _ArmingName(str):
    """A process name that arms ``end_with_parent`` where it is unpickled: spawn sends the
    name with the start-up data, which a new worker reads before importing anything."""

    parent: int

    def __new__(cls, name: str, parent: int) -> _ArmingName:
        obj = super().__new__(cls, name)
        obj.parent = parent
        return obj

    def __reduce__(self) -> tuple:
        return _armed_name, (str(self), self.parent)


def _armed_name(name: str, parent: int) -> str:
    end_with_parent(parent)
    return name


class _ArmedProcess(SpawnProcess):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._name = _ArmingName(self._name, os.getpid())


class _ArmedSpawnContext(SpawnContext):
    Process = _ArmedProcess


def loader_worker_init(worker_id: int, parent: int) -> None:
    """A DataLoader's ``worker_init_fn``: ``partial(loader_worker_init, parent=os.getpid())``."""
    end_with_parent(parent)


def _set_pdeathsig(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent (thread) dies; False
    where that is not possible (another system, no libc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _exit_with_parent(parent: int, every: float = 0.2) -> None:
    """Exit as soon as ``parent`` is gone (the fallback where PDEATHSIG is missing)."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)
