"""Self-check of a machine for a recipe, before spending GPU hours (``scripts/doctor.py``).

Each check is a small function of a :class:`Probe` (config, device, speed memo, the
recipe's training data) that returns one :class:`Row`: a name, ``ok`` / ``warn`` /
``fail`` and a one-line figure or advice. :func:`run_checks` runs them all; an exception
inside one becomes that check's ``fail`` row (its one-line message, no traceback) and
the others still run. On a machine without CUDA the GPU checks say "no GPU" and the rest
run on the CPU.

The steps the doctor runs are training's: ``engine.train_step`` on batches of the
training dataset's own items (``build_loaders`` over a temporary cache of a few training
images: augmentation, ``data.patch_size`` patches, the sample fields the loss reads),
collated by the training contract, with the recipe's loss. Without training data the
items are random ones made through the same contract (``Sample.synthetic``).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bonecomp.classes import NUM_CLASSES
from bonecomp.config import Config, ConfigError
from bonecomp.data.cache import CacheSpec, bytes_per_image, cache_folder, open_cache
from bonecomp.data.layout import DataLayoutError, discover
from bonecomp.data.sample import IMAGE
from bonecomp.device import amp_dtype, pick_device, resolve_channels_last
from bonecomp.engine import StepContext, batch_size, train_step
from bonecomp.inference.postprocess import upsample_threshold
from bonecomp.losses import build_loss
from bonecomp.models import SegModel, create_model
from bonecomp.models.checkpointing import set_grad_checkpointing
from bonecomp.models.encoder_weights import WeightsError, hub_host, hub_offline, reachable
from bonecomp.optim import build_optimizer
from bonecomp.training.data import DATA_ERRORS, FoldData, build_loaders, train_sample

Status = Literal["ok", "warn", "fail"]
NO_GPU = "no GPU"
COMPETITION_IMAGES = 800  # FORMAT.md: the real training set, assumed when no data is found
SOURCE_SIZE = 2048  # FORMAT.md: the X-rays' side, where submissions are scored
GiB = 1024**3


@dataclass
class Row:
    """One line of the doctor's table."""

    name: str
    status: Status
    message: str


@dataclass
class Probe:
    """What every check gets: the recipe, the device it will train on, the speed memo and
    the recipe's training data (built once, on first use; ``close`` removes it)."""

    cfg: Config
    device: torch.device
    quick: bool = False
    _speed: dict[bool, float] = field(default_factory=dict, repr=False)
    _data: FoldData | Exception | None = field(default=None, repr=False)
    _files: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def small_batch(self) -> int:
        """The batch of the cheap checks (finite loss, CPU timings)."""
        return min(self.cfg.train.batch_size, 1 if self.quick else 2)

    @property
    def speed_batch(self) -> int:
        """The recipe's batch on a GPU (throughput depends on it); a small one on CPU."""
        return self.cfg.train.batch_size if self.cuda and not self.quick else self.small_batch

    def images_per_s(self, channels_last: bool) -> float:
        """Training images/s (forward, backward, optimizer step) of the recipe's model at
        ``speed_batch`` in one memory format; both formats are measured once, together."""
        if not self._speed:
            if self.cuda:
                warmup, steps = (2, 5) if self.quick else (3, 10)
            else:
                warmup, steps = (1, 2) if self.quick else (1, 3)
            self._speed = _time_formats(self, self.speed_batch, warmup, steps)
        return self._speed[channels_last]

    def training_data(self) -> FoldData:
        """The recipe's loaders (``build_loaders``, as training builds them) over a
        temporary cache of the first 16 training images (8 with ``quick``), built once;
        ``DataLayoutError`` when ``data.root`` holds no training data (any error of the
        data is raised again on each call, not retried)."""
        if self._data is None:
            try:
                self._data = self._build_training_data()
            except Exception as e:
                self._data = e
        if isinstance(self._data, Exception):
            raise self._data
        return self._data

    def _build_training_data(self) -> FoldData:
        d = self.cfg.data
        df = discover(d.root, "train", d.exclude)
        n = min(len(df), 8 if self.quick else 16)
        tmp = self._files.enter_context(tempfile.TemporaryDirectory(prefix="bonecomp-doctor-"))
        spec = CacheSpec.from_config(self.cfg)  # the recipe's cache, as training builds it
        cache = open_cache(df.iloc[:n], tmp, spec, workers=1, progress=False)
        rows = np.arange(len(cache))
        with _no_worker_warning():
            return build_loaders(self.cfg, cache, rows, rows[:1], pin_memory=self.cuda)

    def batch(self, n: int) -> tuple[dict, str]:
        """(``n`` training items collated as the training loader does, on the device;
        where they came from). The items are the training dataset's own (augmented, cut
        to ``data.patch_size``, with the fields the loss reads); without usable training
        data (the data loader row says why), random ones made through the same contract."""
        contract = train_sample(self.cfg)
        try:
            loader = self.training_data().train_loader
        except DATA_ERRORS:
            side = self.cfg.data.patch_size or self.cfg.data.image_size
            soft = self.cfg.data.soft_targets
            batch = contract.collate([contract.synthetic(side, soft, seed=i) for i in range(n)])
            source = "random items: no usable training data"
        else:
            batch = loader.collate_fn([loader.dataset[i % len(loader.dataset)] for i in range(n)])
            source = "training items"
        if contract.extra:
            source += f" with {', '.join(contract.extra)}"
        moved = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        return moved, source

    def close(self) -> None:
        """Remove the temporary training data."""
        self._data = None
        self._files.close()


Check = Callable[[Probe], Row]


def run_checks(
    cfg: Config, quick: bool = False, on_row: Callable[[Row], None] | None = None
) -> list[Row]:
    """Every check of the recipe ``cfg`` on this machine, in table order.

    ``on_row`` is called with each row as soon as it is known (a live table).
    """
    probe = Probe(cfg, _train_device(cfg.train.device), quick)
    rows = []
    try:
        for name, check in CHECKS:
            row = _safe(name, check, probe)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    finally:
        probe.close()
    return rows


def exit_code(rows: list[Row]) -> int:
    """0 unless a row failed (warnings are allowed)."""
    return int(any(r.status == "fail" for r in rows))


def format_row(row: Row) -> str:
    return f"{row.name:<{_NAME_W}}  {row.status:<4}  {row.message}"


def format_table(rows: list[Row]) -> str:
    """The header, one line per row and a count of each status."""
    return "\n".join([format_header(), *map(format_row, rows), format_summary(rows)])


def format_header() -> str:
    return f"{'check':<{_NAME_W}}  {'':<4}  figure / advice\n{'-' * (_NAME_W + 40)}"


def format_summary(rows: list[Row]) -> str:
    n = {s: sum(r.status == s for r in rows) for s in ("ok", "warn", "fail")}
    return f"{n['ok']} ok, {n['warn']} warn, {n['fail']} fail"


def _safe(name: str, check: Check, probe: Probe) -> Row:
    try:
        return check(probe)
    except Exception as e:  # a check's failure is a row, never a crash of the doctor
        return Row(name, "fail", _first_line_and_type(e))
    finally:
        if probe.cuda:
            torch.cuda.empty_cache()


def _first_line_and_type(e: BaseException) -> str:
    """The first line of an exception's message; the type too unless it is one of ours
    (whose messages already say what is wrong and where)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    if type(e).__module__.startswith("bonecomp") and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --- the checks ---------------------------------------------------------------------------


def check_torch(probe: Probe) -> Row:
    """torch, CUDA and cuDNN versions."""
    cuda = torch.version.cuda or "none (CPU build)"
    v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    on = "enabled" if torch.backends.cudnn.enabled else "DISABLED"
    dnn = f"cuDNN {v // 10000}.{v // 100 % 100}.{v % 100} {on}" if v else "no cuDNN"
    if v and not torch.backends.cudnn.enabled and probe.cuda:
        return Row("torch", "warn", f"torch {torch.__version__}, CUDA {cuda}, {dnn}: convs slow")
    return Row("torch", "ok", f"torch {torch.__version__}, CUDA {cuda}, {dnn}")


def check_gpu(probe: Probe) -> Row:
    """Device name, memory, bf16; a CUDA device asked for but missing fails."""
    want = probe.cfg.train.device
    if not probe.cuda:
        if want.startswith("cuda"):
            return Row(
                "gpu",
                "fail",
                f"train.device={want} but torch sees no CUDA GPU ({_why_no_cuda()}): fix the "
                "driver / install a CUDA build of torch, or set train.device=cpu",
            )
        return Row("gpu", "warn", f"{NO_GPU} ({_why_no_cuda()}): training runs on the CPU")
    n = torch.cuda.device_count()
    if probe.device.index >= n:
        return Row(
            "gpu", "fail", f"train.device={want} but {n} GPU(s) visible: use cuda:0 to cuda:{n - 1}"
        )
    p = torch.cuda.get_device_properties(probe.device)
    bf16 = torch.cuda.is_bf16_supported()
    amp = amp_dtype(probe.device, probe.cfg.train.amp)
    amp_s = f"AMP {str(amp).removeprefix('torch.')}" if amp else "AMP off (train.amp=false)"
    return Row(
        "gpu",
        "ok",
        f"{p.name} ({probe.device}, {n} visible), {p.total_memory / GiB:.1f} GiB, "
        f"sm_{p.major}{p.minor}, bf16 {'yes' if bf16 else 'no'}, {amp_s}",
    )


def check_amp_step(probe: Probe) -> Row:
    """A training step of the recipe's model gives a finite loss; peak GPU memory."""
    cfg, dev = probe.cfg, probe.device
    cl = resolve_channels_last(cfg.train.channels_last, dev)
    trainer = _trainable(cfg, dev, cl)
    amp = trainer.amp
    b = probe.small_batch
    batch, source = probe.batch(b)
    what = f"{type(trainer.model.net).__name__}/{cfg.model.encoder}"
    precision = str(amp).removeprefix("torch.") if amp else "float32"
    if probe.cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    loss = _train_step(trainer, batch)
    what = f"{what}, {precision}, batch {b} x {_inputs(cfg, batch)} ({source})"
    if not math.isfinite(loss):
        return Row("amp step", "fail", f"{what}: loss is {loss}; try train.amp=false")
    msg = f"{what}: loss {loss:.3f} finite"
    if not probe.cuda:
        return Row("amp step", "ok", f"{msg} ({NO_GPU}: no AMP, no GPU memory figure)")
    total = torch.cuda.get_device_properties(dev).total_memory
    msg += f", peak {torch.cuda.max_memory_allocated(dev) / GiB:.2f} GiB"
    full = cfg.train.batch_size
    if full == b or probe.quick:
        return Row("amp step", "ok", msg)
    del batch
    big = probe.batch(full)[0]
    torch.cuda.reset_peak_memory_stats(dev)
    try:
        loss = _train_step(trainer, big)
    except torch.cuda.OutOfMemoryError:
        return Row(
            "amp step",
            "fail",
            f"{msg}; train.batch_size={full} is out of memory ({total / GiB:.0f} GiB): lower "
            "train.batch_size and raise train.accum_steps",
        )
    peak = torch.cuda.max_memory_allocated(dev)
    msg += f"; batch {full} (train.batch_size): peak {peak / GiB:.2f} GiB of {total / GiB:.0f}"
    if not math.isfinite(loss):
        return Row("amp step", "fail", f"{msg}, loss {loss}; try train.amp=false")
    if peak > 0.9 * total:
        return Row("amp step", "warn", f"{msg}: near the limit, lower train.batch_size")
    return Row("amp step", "ok", msg)


def check_channels_last(probe: Probe) -> Row:
    """NCHW vs channels_last training speed here, and the format the config picks."""
    cfg = probe.cfg
    chosen = resolve_channels_last(cfg.train.channels_last, probe.device)
    nchw, nhwc = probe.images_per_s(channels_last=False), probe.images_per_s(channels_last=True)
    gain = nhwc / nchw - 1
    setting = f"train.channels_last={_yaml(cfg.train.channels_last)}"
    msg = (
        f"NCHW {_rate(nchw)} img/s, channels_last {_rate(nhwc)} img/s ({gain:+.0%}) at batch "
        f"{probe.speed_batch} x {_inputs(cfg)}; {setting} -> "
        f"{'channels_last' if chosen else 'NCHW'}"
    )
    slower = gain < -0.1 if chosen else gain > 0.1
    if slower:
        better = "true" if gain > 0 else "false"
        return Row("channels_last", "warn", f"{msg}: the other is faster here, set {better}")
    return Row("channels_last", "ok", msg)


def check_cuda_postprocess(probe: Probe, size: int = 512) -> Row:
    """The CUDA upsample + threshold + RLE gives the CPU path's strings, byte for byte."""
    if not probe.cuda:
        return Row("cuda rle", "ok", f"{NO_GPU}: skipped (post-processing runs on the CPU here)")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(NUM_CLASSES, size, size, generator=g)
    # smooth blobs plus pixel noise: masks with edges, and values near the threshold
    logits = torch.nn.functional.avg_pool2d(noise[None], 15, 1, 7)[0] * 12 - 1 + noise * 0.05
    out = (SOURCE_SIZE, SOURCE_SIZE)
    t0 = time.perf_counter()
    cpu = upsample_threshold(logits, out).rle()
    t_cpu = time.perf_counter() - t0
    x = logits.to(probe.device)
    upsample_threshold(x, out).rle()  # warm-up: kernels, allocator
    torch.cuda.synchronize(probe.device)
    t0 = time.perf_counter()
    gpu = upsample_threshold(x, out).rle()
    torch.cuda.synchronize(probe.device)
    t_gpu = time.perf_counter() - t0
    differ = [c for c in range(NUM_CLASSES) if cpu[c] != gpu[c]]
    what = f"{NUM_CLASSES} x {size}^2 logits -> {SOURCE_SIZE}^2 RLE"
    if differ:
        return Row(
            "cuda rle",
            "fail",
            f"{what}: {len(differ)} of {NUM_CLASSES} classes differ from the CPU path "
            f"(e.g. class {differ[0]}): post-process on the CPU and report this line",
        )
    return Row(
        "cuda rle",
        "ok",
        f"{what}: identical to CPU (CUDA {t_gpu * 1e3:.0f} ms, CPU {t_cpu * 1e3:.0f} ms)",
    )


def check_process_group(probe: Probe) -> Row:
    """A one-process group (nccl on CUDA, gloo on CPU) starts and all-reduces."""
    backend = "nccl" if probe.cuda else "gloo"
    if not dist.is_available() or not dist.is_backend_available(backend):
        return Row("process group", "fail", f"torch.distributed {backend} is not available")
    if dist.is_initialized():
        return Row("process group", "warn", "a process group is already running: not tested")
    port = _free_port()
    t0 = time.perf_counter()
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=60),
        **({"device_id": probe.device} if probe.cuda else {}),
    )
    try:
        x = torch.full((4,), 2.0, device=probe.device)
        dist.all_reduce(x)
        ok = bool((x == 2.0).all())
    finally:
        dist.destroy_process_group()
    took = time.perf_counter() - t0
    if not ok:
        return Row("process group", "fail", f"{backend}: all_reduce gave {x.tolist()}")
    return Row(
        "process group",
        "ok",
        f"{backend}, 1 process on 127.0.0.1:{port}: all_reduce ok ({took:.1f} s)",
    )


def check_data_loader(probe: Probe) -> Row:
    """The recipe's loader on a few cached images vs the model's speed: is data the
    bottleneck?"""
    cfg = probe.cfg
    d = cfg.data
    try:
        data = probe.training_data()
    except DataLayoutError as e:  # names the path, and says how to get data
        return Row("data loader", "warn", f"no usable training data (data.root): {e}")
    workers = d.num_workers
    n_batches = max(4, 3 * workers) if probe.quick else max(8, 4 * workers)
    skip = max(1, workers)  # first batches: worker start-up
    with _no_worker_warning():
        it = _loader_batches(data, skip + n_batches)
        for _ in range(skip):
            next(it)
        t0 = time.perf_counter()
        got = sum(batch_size(b) for b in it)
        rate = got / (time.perf_counter() - t0)
        del it
    cores = os.cpu_count() or 1
    model = probe.images_per_s(resolve_channels_last(cfg.train.channels_last, probe.device))
    msg = (
        f"{_rate(rate)} samples/s with data.num_workers={workers} ({cores} CPU cores) vs "
        f"model {_rate(model)} img/s at {_inputs(cfg)}"
    )
    if workers > cores:
        return Row("data loader", "warn", f"{msg}: more workers than cores, lower data.num_workers")
    if rate < model:
        hint = "raise data.num_workers" if workers < cores else "the CPU is the bottleneck"
        return Row("data loader", "warn", f"{msg}: data is the bottleneck, {hint}")
    return Row("data loader", "ok", f"{msg}: the model is the bottleneck")


def check_encoder_weights(probe: Probe) -> Row:
    """null: from scratch; a path: loads into the encoder; imagenet: cached or reachable."""
    m = probe.cfg.model
    w = m.encoder_weights
    if w is None:
        return Row("encoder weights", "ok", "model.encoder_weights=null: from scratch")
    if w != "imagenet":
        try:
            create_model(m)  # the model is built without weights, then the file is loaded
        except WeightsError as e:
            return Row("encoder weights", "fail", _first_line_and_type(e))
        except Exception as e:  # e.g. a corrupt file: name it
            return Row(
                "encoder weights", "fail", f"model.encoder_weights={w}: {_first_line_and_type(e)}"
            )
        return Row("encoder weights", "ok", f"{w} loads into {m.encoder}")
    try:
        with hub_offline():
            create_model(m)
        return Row(
            "encoder weights", "ok", f"imagenet {m.encoder}: in the local Hugging Face cache"
        )
    except WeightsError as e:  # not cached, and the hub is unreachable: says what to do
        return Row("encoder weights", "fail", _first_line_and_type(e))
    except Exception:
        pass  # not cached (the hub was reachable, but we asked for the cache only)
    host = hub_host()
    if reachable(host, port=443, timeout=3.0):
        return Row(
            "encoder weights",
            "ok",
            f"imagenet {m.encoder}: not cached yet, {host} reachable (downloaded once, "
            "on the first training run)",
        )
    return Row(
        "encoder weights",
        "fail",
        f"imagenet {m.encoder}: not cached and {host} unreachable: set "
        "model.encoder_weights=null or a local file path, or download once while online",
    )


def check_cache_disk(probe: Probe) -> Row:
    """Free disk at data.cache_dir vs the cache this recipe will build there."""
    d = probe.cfg.data
    folder = cache_folder(d)  # the folder training builds (crop and preprocessing named)
    if (folder / "manifest.json").is_file():
        return Row("cache disk", "ok", f"{folder} already built")
    try:
        n, whence = len(discover(d.root, "train", d.exclude)), "training images"
    except DataLayoutError:
        n, whence = COMPETITION_IMAGES, "images (no data found: the competition's count)"
    need = n * bytes_per_image(d.image_size)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    msg = (
        f"free {_size(free)} at {existing} for data.cache_dir={d.cache_dir}; the "
        f"{d.image_size} px cache of {n} {whence} needs {_size(need)}"
    )
    if free < need:
        return Row("cache disk", "fail", f"{msg}: free space or set data.cache_dir elsewhere")
    if free < 1.2 * need:
        return Row("cache disk", "warn", f"{msg}: under 20% to spare")
    return Row("cache disk", "ok", msg)


CHECKS: list[tuple[str, Check]] = [
    ("torch", check_torch),
    ("gpu", check_gpu),
    ("amp step", check_amp_step),
    ("channels_last", check_channels_last),
    ("cuda rle", check_cuda_postprocess),
    ("process group", check_process_group),
    ("data loader", check_data_loader),
    ("encoder weights", check_encoder_weights),
    ("cache disk", check_cache_disk),
]
_NAME_W = max(len(name) for name, _ in CHECKS)


# --- helpers ------------------------------------------------------------------------------


def _train_device(pref: str) -> torch.device:
    """The device training will use; CPU when CUDA is asked for but missing (the gpu row
    fails then, and the other checks still run)."""
    try:
        device = pick_device(pref, "train.device")
    except ConfigError:
        return torch.device("cpu")
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return "torch is a CPU build"
    return f"torch built for CUDA {torch.version.cuda}, no usable device or driver"


@dataclass
class _Trainer:
    model: SegModel
    opt: torch.optim.Optimizer
    loss_fn: nn.Module
    ctx: StepContext

    @property
    def amp(self) -> torch.dtype | None:
        return self.ctx.amp_dtype


def _trainable(cfg: Config, device: torch.device, channels_last: bool) -> _Trainer:
    """The recipe's model (no downloaded weights), optimizer, loss and step settings (AMP,
    grad scaler, clipping, memory format) as training builds them. The step's
    out-of-memory retry and non-finite check are off: the checks report both."""
    model = create_model(cfg.model.model_copy(update={"encoder_weights": None})).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    set_grad_checkpointing(model, cfg.train.grad_checkpointing)  # the memory training sees
    model.train()
    opt = build_optimizer(model, cfg.train)
    amp = amp_dtype(device, cfg.train.amp)
    ctx = StepContext(
        device,
        amp_dtype=amp,
        scaler=torch.amp.GradScaler("cuda") if amp == torch.float16 else None,
        grad_clip=cfg.train.grad_clip,
        channels_last=channels_last,
        progress=False,
        soft_targets=cfg.data.soft_targets,
        oom_retry=False,
        check_finite=False,
    )
    return _Trainer(model, opt, build_loss(cfg.loss), ctx)


def _inputs(cfg: Config, batch: dict | None = None) -> str:
    """What one training input is: "256 px images", or "32 px patches of 64 px images"
    (the side read from ``batch`` when given)."""
    side = int(batch[IMAGE].shape[-1]) if batch is not None else None
    d = cfg.data
    if d.patch_size is None:
        return f"{side or d.image_size} px images"
    return f"{side or d.patch_size} px patches of {d.image_size} px images"


def _train_step(trainer: _Trainer, batch: dict[str, torch.Tensor]) -> float:
    """One training update (``engine.train_step``, as training runs it); the loss."""
    return train_step(trainer.model, [batch], trainer.opt, trainer.loss_fn, trainer.ctx)["loss"]


def _time_formats(probe: Probe, batch: int, warmup: int, steps: int) -> dict[bool, float]:
    """Training images/s in NCHW (False) and channels_last (True), best step of ``steps``.

    Steps of the two formats alternate, so a busy machine slows both alike, and the best
    step ignores the slow ones; CUDA is synchronised around each timed step.
    """
    cfg, dev = probe.cfg, probe.device
    items = probe.batch(batch)[0]  # the same items in both formats
    runs = {cl: (_trainable(cfg, dev, cl), items) for cl in (False, True)}
    best = dict.fromkeys(runs, math.inf)
    for i in range(warmup + steps):
        for cl, (trainer, b) in runs.items():
            if probe.cuda:
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            _train_step(trainer, b)
            if probe.cuda:
                torch.cuda.synchronize(dev)
            if i >= warmup:
                best[cl] = min(best[cl], time.perf_counter() - t0)
    return {cl: batch / t for cl, t in best.items()}


@contextlib.contextmanager
def _no_worker_warning() -> Iterator[None]:
    """Without torch's "more workers than cores" warning: the data loader row says so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        yield


def _loader_batches(data: FoldData, n: int) -> Iterator[dict]:
    """``n`` batches of the trainer's own training loader (as many epochs of the few
    cached images as it takes)."""
    loader = data.train_loader
    while n > 0:
        for batch in loader:
            yield batch
            n -= 1
            if n == 0:
                return


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.1f} MiB"


def _rate(v: float) -> str:
    """Three significant figures, without exponent for the rates we see (0.0421, 5.31, 402)."""
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _yaml(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)
