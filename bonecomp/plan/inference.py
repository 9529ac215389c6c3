"""The inference side of the plan: the ensemble's own code on a fake CUDA device.

``Ensemble.__call__`` (TTA views and scales, windows of a patch member or of
``infer.sliding_window``, the weighted mean on the common grid) runs on fake tensors
under CUDA autocast, for one batch of ``infer.batch_size`` test images, with every
member's weights resident as inference loads them. Every member is this recipe's model
(the members of other experiments named in ``infer.ensemble`` are taken to be the same
architecture: the plan reads no checkpoints). Two members are run (the second one's
pass meets the first's running sum, as every later one does); the others add their
weights. A member's forward is computed once per input shape and replayed for the
other windows, views and members (the same operators on the same shapes: the same
peak above what is alive, the same output, the same FLOPs), which keeps a 3 x 3-window,
two-view plan to one forward. With ``infer.crop`` the carpal crop stage's members run
afterwards on one box at this recipe's input size.

Not counted (allowances): the post-processing (per-class upsampling of each image to
2048 x 2048 in its classes' boxes, on the GPU when inference runs there) and the
loader's pinned host memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bonecomp.config import Config
from bonecomp.data.dataset import to_float_image
from bonecomp.inference.ensemble import Ensemble, Member
from bonecomp.inference.sliding import tile_starts
from bonecomp.inference.tta import scaled_side, views
from bonecomp.plan.fake import (
    BUFFERS,
    CUDA_BLOCK,
    INPUTS,
    WEIGHTS,
    MemoryTrace,
    cuda_autocast,
    fake_mode,
    storage_bytes,
)
from bonecomp.plan.training import build_model


@dataclass
class InferenceFigures:
    """One batch of test images through the ensemble (bytes, FLOPs)."""

    batch: int  # images per forward (infer.batch_size)
    members: int  # first-stage members (infer.ensemble's folds)
    crop_members: int  # carpal crop stage members (0: none)
    views: list[str]  # the TTA views x scales (labels)
    windows: dict[str, int]  # per view label: windows per image (1: the whole image)
    forwards_per_image: int  # image-forwards of a model per test image, all stages
    member_weight_bytes: int  # parameters + buffers of one member
    peak: int  # weights of every member + the largest pass, as max_memory_allocated reads it
    at_peak: dict[str, int] = field(default_factory=dict)
    flops_per_image: int = 0
    other_experiments: list[str] = field(default_factory=list)  # assumed to be this model


def member_count(cfg: Config) -> tuple[int, list[str]]:
    """First-stage members and the experiments other than this recipe's among them."""
    if cfg.infer.ensemble:
        n = sum(len(e.folds) for e in cfg.infer.ensemble)
        others = sorted({e.experiment for e in cfg.infer.ensemble} - {cfg.train.experiment})
        return n, others
    return cfg.data.n_splits, []  # every trained fold of the recipe's own experiment


def windows_per_image(side: int, tile: int | None, overlap: float) -> int:
    """Windows of ``tile`` over a ``side`` x ``side`` input (``sliding.sliding_window``)."""
    if not tile or tile >= side:
        return 1
    stride = max(1, round(tile * (1 - overlap)))
    return len(tile_starts(side, tile, stride)) ** 2


class _PlannedEnsemble(Ensemble):
    """The ensemble's code, each member forward under CUDA autocast on the fake device,
    computed once per input shape and replayed after (see the module)."""

    def __init__(
        self, *args, dtype: torch.dtype | None, trace: MemoryTrace, replay: bool, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.dtype, self.trace, self.replay = dtype, trace, replay
        self._seen: dict[tuple, tuple[int, tuple, int]] = {}
        self.forwards = 0  # image-forwards of a model, replays included

    def _autocast(self, device: torch.device):
        return cuda_autocast(self.dtype)

    def _forward(self, m: Member, device: torch.device):
        run = super()._forward(m, device)
        trace = self.trace

        def once(x: torch.Tensor) -> torch.Tensor:
            self.forwards += x.shape[0]
            key = (tuple(x.shape), x.dtype, tuple(x.stride()))
            if key not in self._seen or not self.replay:
                before, flops = trace.total, trace.flops
                trace.window_peak = before
                out = run(x)  # its metadata only: holding it would keep its bytes alive
                like = (out.shape, out.stride(), out.dtype, out.device)
                self._seen[key] = (trace.window_peak - before, like, trace.flops - flops)
                return out
            transient, (shape, stride, dtype, device), flops = self._seen[key]
            trace.bump(transient)
            trace.flops += flops
            return torch.empty_strided(shape, stride, dtype=dtype, device=device)

        return once


def trace_inference(
    cfg: Config, dtype: torch.dtype | None = torch.float16, replay: bool = True
) -> InferenceFigures:
    """The plan of one batch of ``infer.batch_size`` test images (see the module;
    ``replay=False`` runs every forward, what the replay is checked against)."""
    inf = cfg.infer
    dtype = dtype if inf.amp else None
    cuda = torch.device("cuda")
    mode = fake_mode()
    with mode, cuda:
        net = build_model(cfg).eval()
    trace = MemoryTrace(CUDA_BLOCK)
    trace.track(list(net.parameters()), WEIGHTS)
    trace.track(list(net.buffers()), BUFFERS)
    weight_bytes = storage_bytes(list(net.parameters())) + storage_bytes(list(net.buffers()))
    n, others = member_count(cfg)
    n_crop = len(inf.crop.folds) if inf.crop.experiment else 0
    side, patch = cfg.data.image_size, cfg.data.patch_size
    tta = views(inf.tta, inf.scales)
    tile = patch or (inf.tile if inf.sliding_window else None)
    windows = {
        v.label: windows_per_image(scaled_side(side, v.scale), tile, inf.overlap) for v in tta
    }

    def stage(members: int, weights: list[float]) -> tuple[_PlannedEnsemble, int]:
        traced = min(members, 2)
        ms = [Member(f"member{i}", net, side, float(weights[i]), patch_size=patch)
              for i in range(traced)]  # fmt: skip
        tile_ = inf.tile if inf.sliding_window else None
        ens = _PlannedEnsemble(
            ms, tta, tile_, inf.overlap, inf.amp, dtype=dtype, trace=trace, replay=replay
        )
        return ens, traced

    with mode, trace, torch.no_grad():
        trace.reset_peak()
        first, traced = stage(n, [e.weight for e in inf.ensemble for _ in e.folds] or [1.0] * n)
        with trace.phase(INPUTS), cuda:
            grey = torch.randint(0, 256, (inf.batch_size, side, side), dtype=torch.uint8)
        pred = first({first.members[0].input_key: to_float_image(grey)})
        del pred, grey
        forwards = first.forwards / traced * n / inf.batch_size
        flops = trace.flops / traced * n / inf.batch_size
        if n_crop:
            before = trace.flops
            crop, traced_crop = stage(n_crop, [1.0] * n_crop)
            with trace.phase(INPUTS), cuda:
                grey = torch.randint(0, 256, (1, side, side), dtype=torch.uint8)
            pred = crop({crop.members[0].input_key: to_float_image(grey)})
            del pred, grey
            forwards += crop.forwards / traced_crop * n_crop
            flops += (trace.flops - before) / traced_crop * n_crop
    resident = (n + n_crop - 1) * weight_bytes  # the fake members share one model's weights
    at_peak = dict(trace.at_peak)
    at_peak[WEIGHTS] = at_peak.get(WEIGHTS, 0) + resident
    return InferenceFigures(
        batch=inf.batch_size,
        members=n,
        crop_members=n_crop,
        views=[v.label for v in tta],
        windows=windows,
        forwards_per_image=round(forwards),
        member_weight_bytes=weight_bytes,
        peak=trace.peak + resident,
        at_peak={k: v for k, v in at_peak.items() if v},
        flops_per_image=round(flops),
        other_experiments=others,
    )
