"""Running the recipe's code on fake tensors: shapes, dtypes and storages, no data.

``FakeTensorMode`` runs every operator's shape function instead of its kernel, so a
model at 2048 px builds and steps in seconds with no memory, also on a fake ``cuda``
device where CUDA autocast picks the dtypes a GPU would. What it gives is exact for
what the operators allocate; what it cannot see is the CUDA context, the caching
allocator's slack and cuDNN's workspace (``plan.FRAMEWORK`` allowances).

* :class:`MemoryTrace` (a dispatch mode) keeps the bytes of every tensor storage alive,
  by category (weights, optimizer state, gradients, activations, temporaries), and
  the peak with what was alive at that moment.
* :func:`cuda_autocast` is ``torch.autocast("cuda", dtype)`` for a fake CUDA device
  (torch's own refuses when no GPU is present).
* ``.item()`` is 1 under a ``MemoryTrace`` (1.0 for floats): fake tensors hold no
  values, and the loss and the training step read a few scalars only to log them.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import conv_flop_count, flop_registry

CUDA_BLOCK = 512  # the caching allocator rounds every block up to 512 bytes

# categories of MemoryTrace
WEIGHTS = "weights"
BUFFERS = "buffers"
EMA = "EMA copy"
OPTIMIZER = "optimizer state"
GRADIENTS = "gradients"
INPUTS = "input batch"
ACTIVATIONS = "activations"  # made in the forward (and the loss), still alive
WEIGHT_COPIES = "autocast weight copies"
BACKWARD = "backward temporaries"
STEP = "clip + optimizer temporaries"
CATEGORIES = (
    WEIGHTS, BUFFERS, EMA, OPTIMIZER, GRADIENTS, INPUTS, ACTIVATIONS, WEIGHT_COPIES,
    BACKWARD, STEP,
)  # fmt: skip


def _conv_backward_flops(grad_out, x, w, *args, out_val=None, **kwargs) -> int:
    """A convolution's backward: each requested gradient (input, weight) costs one
    forward. torch's formula (2.14) counts the weight gradient of a grouped convolution
    as if it were not grouped, 64 times too many for EfficientNet's 64-channel depthwise
    convolutions (pytorch/pytorch#183405 divides it by the groups)."""
    transposed, output_mask = args[4], args[7]
    forward = conv_flop_count(list(x.shape), list(w.shape), list(grad_out.shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


FLOPS = {**flop_registry, torch.ops.aten.convolution_backward: _conv_backward_flops}


def fake_mode() -> FakeTensorMode:
    """A fake-tensor mode that takes real tensors created inside it as fake."""
    return FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype | None) -> Iterator[None]:
    """CUDA autocast to ``dtype`` (None: off) without a GPU: what ``torch.autocast``
    does on entry and exit, without its check that CUDA is available."""
    if dtype is None:
        yield
        return
    was_on, was_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", was_on)
        torch.set_autocast_dtype("cuda", was_dtype)


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass in this thread (what
    ``torch.utils.checkpoint`` itself asks to tell a recomputation apart)."""
    return torch._C._current_graph_task_id() != -1


class MemoryTrace(TorchDispatchMode):
    """Bytes of every tensor storage alive, by category; the peak and what made it.

    A storage is counted once, when an operator first returns it (views share it), and
    uncounted when it is freed. Its category is ``category`` (set by the caller around
    phases), ``BACKWARD`` while the autograd engine runs, ``WEIGHT_COPIES`` for the
    low-precision copies autocast makes of weights; ``track`` registers existing
    tensors (the weights) and ``retag`` moves one to another category (a gradient once
    it is accumulated). ``round_to`` rounds each storage up as the CUDA caching
    allocator does (512); 1 for the CPU. Since ``reset_peak``: ``forward_end`` is what
    was alive when the first backward operator ran, and what operators make after the
    backward (gradient clipping, the optimiser step) is ``STEP``; ``phase_peaks`` holds
    the peak (and what was alive then) of the optimiser step (``"step"``, while
    ``stepping`` is set, by the optimiser's hooks) and of the rest of the training step
    (``"forward/backward"``) apart. ``flops`` counts the floating-point operations of every operator
    with a formula in torch's ``flop_registry`` (convolutions and matrix products, forward
    and backward: what ``FlopCounterMode`` counts, without its module tracking, which
    keeps tensors alive longer and would change the memory measured), a convolution's
    backward by ``_conv_backward_flops``.
    """

    def __init__(self, round_to: int = 1) -> None:
        super().__init__()
        self.round_to = round_to
        self.category = ACTIVATIONS
        self.live: dict[str, int] = defaultdict(int)
        self.total = 0
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self.forward_end: dict[str, int] | None = None
        self.phase_peaks: dict[str, tuple[int, dict[str, int]]] = {}
        self.stepping = False
        self.flops = 0
        self.window_peak = 0  # the largest total since the caller last set it
        self._known: dict[int, list] = {}  # id(storage) -> [bytes, category, weakref]
        self._weights: set[int] = set()

    # --- what the caller tells it -----------------------------------------------------
    def track(self, tensors, category: str) -> None:
        """Count existing tensors (parameters, buffers, optimizer state) as ``category``."""
        for t in tensors:
            self._add(t, category)
            if category in (WEIGHTS, BUFFERS):
                self._weights.add(id(t.untyped_storage()))

    def retag(self, t: torch.Tensor, category: str) -> None:
        entry = self._known.get(id(t.untyped_storage()))
        if entry is not None and entry[1] != category:
            self.live[entry[1]] -= entry[0]
            self.live[category] += entry[0]
            entry[1] = category

    def reset_peak(self) -> None:
        self.peak, self.at_peak = self.total, dict(self.live)
        self.forward_end = None
        self.phase_peaks = {}
        self.flops = 0

    @contextlib.contextmanager
    def phase(self, category: str) -> Iterator[None]:
        was, self.category = self.category, category
        try:
            yield
        finally:
            self.category = was

    def bump(self, nbytes: int) -> None:
        """A transient of ``nbytes`` on top of what is alive now (a replayed forward)."""
        self.window_peak = max(self.window_peak, self.total + nbytes)
        if self.total + nbytes > self.peak:
            self.peak = self.total + nbytes
            self.at_peak = dict(self.live)
            self.at_peak[ACTIVATIONS] = self.at_peak.get(ACTIVATIONS, 0) + nbytes

    def bytes_of(self, category: str) -> int:
        return self.live.get(category, 0)

    # --- the dispatch ------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(): no values here
            return 1.0 if args[0].dtype.is_floating_point else 1
        out = func(*args, **(kwargs or {}))
        formula = FLOPS.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **(kwargs or {}), out_val=out)
        backward = in_backward()
        if backward and self.forward_end is None:
            self.forward_end = dict(self.live)
        after = not backward and self.forward_end is not None
        category = BACKWARD if backward else STEP if after else self.category
        if (
            func is torch.ops.aten._to_copy.default
            and args
            and isinstance(args[0], torch.Tensor)
            and id(args[0].untyped_storage()) in self._weights
        ):
            category = WEIGHT_COPIES
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t, category)
        if self.total > self.peak:
            self.peak, self.at_peak = self.total, dict(self.live)
        self.window_peak = max(self.window_peak, self.total)
        phase = "step" if self.stepping else "forward/backward"
        if self.total > self.phase_peaks.get(phase, (0, {}))[0]:
            self.phase_peaks[phase] = (self.total, dict(self.live))
        return out

    def _add(self, t: torch.Tensor, category: str) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._known:
            return
        n = st.nbytes()
        if self.round_to > 1:
            n = -(-n // self.round_to) * self.round_to
        self._known[key] = [n, category, weakref.ref(st, lambda _, key=key: self._free(key))]
        self.live[category] += n
        self.total += n

    def _free(self, key: int) -> None:
        n, category, _ = self._known.pop(key)
        self.live[category] -= n
        self.total -= n
        self._weights.discard(key)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[id(st)] = st.nbytes()
    return sum(seen.values())
