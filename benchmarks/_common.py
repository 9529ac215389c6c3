"""Shared helpers of the benchmark scripts: phantom data, median timing, the results table.

Not a benchmark itself. The scripts import it as ``_common`` (Python puts the script's own
folder, ``benchmarks/``, first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bonecomp.testing import ensure_phantom


def base_parser(description: str, repeats: int = 5, patients: int = 2) -> argparse.ArgumentParser:
    """Arguments every benchmark takes: --repeats, --quick, --data, --patients, --seed."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=repeats, help="timed runs; the median counts")
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny sizes, 1 repeat")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="phantom folder to reuse (made there if it has no train/); default: a temp folder",
    )
    p.add_argument("--patients", type=int, default=patients, help="training patients (2 images)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed")
    return p


@contextlib.contextmanager
def phantom_root(data: Path | None, patients: int, seed: int = 0) -> Iterator[Path]:
    """A 2048 px phantom with ``patients`` training patients (no test split).

    ``data``: reuse that folder if it already holds a phantom, else write one there (kept);
    None: write into a temporary folder removed on exit.
    """
    with contextlib.ExitStack() as stack:
        if data is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        else:
            root = data
        t0 = time.perf_counter()
        if ensure_phantom(root, patients, test_patients=0, size=2048, seed=seed):
            print(f"phantom: {2 * patients} images at 2048 px in {root} "
                  f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
        yield root


def cpu_model() -> str:
    """The CPU's model name (Linux), else the architecture: another CPU model runs other
    float kernels, so trainings and timings differ beyond the last digit."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.machine()


def print_machine(extra: str = "") -> None:
    """CPU model, count and load average: other work on the machine makes timings noisy."""
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, load average {load} (1/5/15 min){extra}")


def status_mib(key: str) -> float:
    """A ``/proc/self/status`` memory figure (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time (s) of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class Row:
    """One line of the table: ours vs the reference, same unit, measured in the same run.

    ``higher_is_better``: throughputs (ratio = ours / ref); else times and sizes
    (ratio = ref / ours). ``target`` is the ratio we aim for (None: information only).
    """

    what: str
    ours: float
    ref: float
    unit: str
    higher_is_better: bool = False
    target: float | None = None

    @property
    def ratio(self) -> float:
        num, den = (self.ours, self.ref) if self.higher_is_better else (self.ref, self.ours)
        return num / den if den > 0 else float("inf")

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "(info)"
        return "target met" if self.ratio >= self.target else "below target"


def fmt(value: float, unit: str) -> str:
    """A figure with its unit, in a readable magnitude."""
    if unit == "s":
        if value < 1e-3:
            return f"{value * 1e6:.0f} us"
        if value < 1:
            return f"{value * 1e3:.2f} ms"
        return f"{value:.2f} s"
    if unit == "dice":
        return f"{value:.4f}"
    if unit == "/s":
        return f"{value:.1f} /s"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"


def print_table(title: str, rows: list[Row]) -> None:
    """Markdown table: what | ours | baseline | ratio | target | verdict."""
    head = ("measured", "ours", "baseline", "ratio", "target", "verdict")
    body = [
        (
            r.what,
            fmt(r.ours, r.unit),
            fmt(r.ref, r.unit),
            f"{r.ratio:.2f}x" if r.ratio < 10 else f"{r.ratio:.1f}x",
            "-" if r.target is None else f">= {r.target:g}x",
            r.verdict,
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in (head, *body)) for i in range(len(head))]
    print(f"\n{title}\n")
    for k, line in enumerate((head, *body)):
        pairs = enumerate(zip(line, widths, strict=True))
        cells = [s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in pairs]
        print("| " + " | ".join(cells) + " |")
        if k == 0:
            print("|" + "|".join(("-" * (w + 2)) for w in widths) + "|")
    print()


def check(ok: bool, message: str, failures: list[str]) -> None:
    """Print an equality check's outcome; remember failures for the exit status."""
    print(f"{'OK  ' if ok else 'FAIL'} {message}")
    if not ok:
        failures.append(message)


def finish(failures: list[str]) -> None:
    """Exit non-zero when an equality check failed (never for a missed speed target)."""
    if failures:
        print(f"\n{len(failures)} equality check(s) FAILED", file=sys.stderr)
        sys.exit(1)
    print("all equality checks passed")
