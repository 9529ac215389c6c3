"""Streaming ensemble inference: time per image and peak memory as the image count grows.

    .venv/bin/python benchmarks/bench_infer.py [--quick] [--train-seconds 20]

A 2-architecture x 2-fold ensemble (U-Net and FPN on ResNet-18 at 256 px; each
architecture trained briefly on the phantom, its second fold a copy) with hflip TTA, over
10 and over 40 phantom test images at 2048 px, each configuration in a fresh process:
- ours: the path of scripts/infer.py (``predict_submission``): DataLoader prefetch,
  batched TTA, probabilities averaged per batch on the 256 grid, exact sparse upsample
  to 2048, thresholds, RLE, atomic CSV, validation.
- baseline-style loop: per image and model, the TTA-mean probabilities upsampled to 2048
  in float32 (``F.interpolate``) and summed into a full-size map, then > 0.5 and the
  classic RLE per class. Upsampling is linear, so both compute the same masks; the
  table's last row is the Dice between the two CSVs.
Peak memory is the main process's peak RSS above its RSS before the run (VmHWM after a
``clear_refs`` reset); on a GPU the peak allocated GPU memory is printed too.

A second table times the window pass of patch-trained members (issue 17): an untrained
U-Net/ResNet-18 (timing does not depend on the weights) over ``--window-images`` images
of 2048 px in 1024 px windows at overlap 0.5 (3 x 3 per image), each way in a fresh
process: ours (``sliding_window``: one image's Gaussian-weighted accumulators, each tile
added as it comes) against a plain loop that stores every tile's output and blends them
at the end. The model's own time is measured inside the pass, so the blending's share
is ours minus the model (target: blending < 10 % of the model time, i.e. >= 10x); the
outputs must agree (checked).
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import Row, base_parser, print_machine, print_table, status_mib

from bonecomp.config import ModelConfig, load_config
from bonecomp.data.dataset import TestImages
from bonecomp.data.images import png_shapes
from bonecomp.data.layout import discover
from bonecomp.inference.ensemble import load_member
from bonecomp.inference.predict import predict_submission
from bonecomp.inference.sliding import gaussian_weight, sliding_window, tile_starts
from bonecomp.inference.tta import tta_mean, views
from bonecomp.models import create_model
from bonecomp.runs import ensemble_members
from bonecomp.submission import compare_submissions, write_submission
from bonecomp.testing import classic_encode, ensure_phantom
from bonecomp.training import run_training

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
ARCHS = ("unet", "fpn")


def overrides(work: Path, root: Path, **extra) -> list[str]:
    values = {
        "data.root": str(root),
        "data.cache_dir": str(work / "cache"),
        "data.n_splits": 2,
        "train.output_dir": str(work / "runs"),
        "infer.num_workers": 2,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def train_members(work: Path, root: Path, seconds: float) -> None:
    """Train each architecture on fold 0; its fold-1 member is a copy of it (inference
    time and memory do not depend on the weights, only realistic masks matter)."""
    for arch in ARCHS:
        cfg = load_config(
            CONFIG,
            overrides(
                work,
                root,
                **{
                    "model.arch": arch,
                    "train.experiment": arch,
                    "train.epochs": 100,
                    "train.val_every": 100,
                    "train.max_train_minutes": seconds / 60,
                },
            ),
        )
        result = run_training(cfg, fold=0, progress=False)
        print(f"{arch}: val Dice {result.best_dice:.3f} after {seconds:.0f} s")
        shutil.copytree(result.run_dir, result.run_dir.with_name("fold1"))


def ensemble_config(work: Path, root: Path):
    members = "[" + ",".join(f"{{experiment: {a}, folds: [0, 1]}}" for a in ARCHS) + "]"
    return load_config(
        CONFIG, overrides(work, root, **{"infer.ensemble": members, "infer.tta": "[none, hflip]"})
    )


def subset_root(root: Path, tmp: Path, n_images: int) -> Path:
    """A data root whose test split holds the first n_images / 2 patients (symlinks)."""
    sub = tmp / f"test{n_images}"
    (sub / "test" / "DCM").mkdir(parents=True)
    for d in sorted((root / "test" / "DCM").iterdir())[: n_images // 2]:
        (sub / "test" / "DCM" / d.name).symlink_to(d.resolve())
    return sub


def baseline_loop(cfg, data_root: Path, out: Path) -> None:
    members = [load_member(m.checkpoint, m.weight) for m in ensemble_members(cfg)]
    tta = views(cfg.infer.tta)
    test = discover(data_root, "test")
    rows = []
    with torch.no_grad():
        for item in TestImages(test, [256]):
            x = item["image256"][None, None].float().div(255).expand(-1, 3, -1, -1)
            total = None
            for m in members:
                probs = tta_mean(m.model, x, tta)
                up = F.interpolate(
                    probs, size=tuple(item["hw"].tolist()), mode="bilinear", align_corners=False
                )[0]
                total = up if total is None else total + up
            masks = (total / len(members) > 0.5).numpy()
            rows.append((item["name"], [classic_encode(m) for m in masks]))
    write_submission(out, rows)


def _run(which: str, work: str, root: str, data_root: str, out: str, threads: int) -> tuple:
    """In a fresh process: (seconds, peak MiB above the start, peak GPU GiB)."""
    torch.set_num_threads(threads)
    cfg = ensemble_config(Path(work), Path(root))
    before = status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    if which == "ours":
        res = predict_submission(cfg, ensemble_members(cfg), out, data_root, progress=False)
        assert res.report.ok, res.report.problems[:3]
    else:
        baseline_loop(cfg, Path(data_root), Path(out))
    seconds = time.perf_counter() - t0
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return seconds, status_mib("VmHWM") - before, gpu


def stored_tiles(predict, x: torch.Tensor, tile: int, overlap: float) -> torch.Tensor:
    """The plain way: every tile's output kept, then the Gaussian-weighted mean of all."""
    H, W = x.shape[-2:]
    stride = max(1, round(tile * (1 - overlap)))
    spots = [(y, x0) for y in tile_starts(H, tile, stride) for x0 in tile_starts(W, tile, stride)]
    preds = [predict(x[..., y : y + tile, x0 : x0 + tile]).float() for y, x0 in spots]
    weight = gaussian_weight((tile, tile), device=x.device)
    out = x.new_zeros((x.shape[0], preds[0].shape[1], H, W))
    norm = x.new_zeros((H, W))
    for (y, x0), p in zip(spots, preds, strict=True):
        out[..., y : y + tile, x0 : x0 + tile] += p * weight
        norm[y : y + tile, x0 : x0 + tile] += weight
    return out / norm


def _window(which: str, n: int, side: int, tile: int, overlap: float, threads: int) -> tuple:
    """In a fresh process: (seconds, model seconds, peak MiB above the start, a digest of
    the last output for the agreement check)."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)  # the same weights in both processes
    model = create_model(ModelConfig(arch="unet", encoder="resnet18", encoder_weights=None))
    model = model.eval().to(device)
    spent = [0.0]

    def predict(t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = model(t).sigmoid()
        if device.type == "cuda":
            torch.cuda.synchronize()
        spent[0] += time.perf_counter() - t0
        return out

    g = torch.Generator().manual_seed(0)
    images = [torch.rand((1, 3, side, side), generator=g) for _ in range(n)]
    with torch.inference_mode():
        predict(images[0][..., :tile, :tile].to(device))  # warm-up, not timed
        spent[0] = 0.0
        before = status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        t0 = time.perf_counter()
        for x in images:
            x = x.to(device)
            if which == "ours":
                out = sliding_window(predict, x, tile, overlap)
            else:
                out = stored_tiles(predict, x, tile, overlap)
            digest = F.avg_pool2d(out, 16).cpu()
            del out
        seconds = time.perf_counter() - t0
    return seconds, spent[0], status_mib("VmHWM") - before, digest


def window_rows(args) -> list[Row]:
    """The window-pass table: ours vs stored tiles, and the blending's share."""
    side, tile, n = (512, 256, 1) if args.quick else (2048, 1024, args.window_images)
    ctx, got = mp.get_context("spawn"), {}
    for which in ("ours", "stored"):
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            job = pool.submit(_window, which, n, side, tile, 0.5, torch.get_num_threads())
            got[which] = job.result()
    (t_o, model_o, m_o, d_o), (t_s, _, m_s, d_s) = got["ours"], got["stored"]
    diff = float((d_o - d_s).abs().max())
    print(f"window pass: outputs agree to {diff:.2e} (max abs difference of 16 px means)")
    if diff > 1e-5:
        raise SystemExit("window pass: ours and the stored-tiles loop disagree")
    acc = 29 * side * side * 4 / 2**20
    print(f"one image's accumulators (29 classes x {side}^2 float32): {acc:.0f} MiB")
    what = f"{tile} px windows over {side} px, overlap 0.5"
    return [
        Row(f"{what}: time per image", t_o / n, t_s / n, "s"),  # the same work: parity
        Row(
            f"{what}: blending (ours) vs model",
            (t_o - model_o) / n,
            model_o / n,
            "s",
            higher_is_better=False,
            target=10,
        ),
        Row(f"{what}: peak RSS", m_o, m_s, "MiB"),
    ]


def main() -> None:
    ap = base_parser(__doc__, repeats=1, patients=4)
    ap.add_argument("--train-seconds", type=float, default=75, help="training per architecture")
    ap.add_argument("--counts", nargs="+", type=int, default=[10, 40], help="test image counts")
    ap.add_argument("--window-images", type=int, default=2, help="window table: 2048 px images")
    ap.add_argument("--window-only", action="store_true", help="the window table alone")
    args = ap.parse_args()
    counts = [4, 8] if args.quick else args.counts
    print_machine(f", torch threads {torch.get_num_threads()}")
    if args.window_only:
        print_table("Window pass of a patch member: ours vs stored tiles", window_rows(args))
        return
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        tmp = Path(tmp)
        root = args.data or tmp / "phantom"
        t0 = time.perf_counter()
        if ensure_phantom(root, args.patients, max(counts) // 2, size=2048, seed=args.seed):
            print(f"phantom in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        train_members(tmp, root, 5 if args.quick else args.train_seconds)
        print(f"trained {len(ARCHS)} architectures in {time.perf_counter() - t0:.0f} s")
        rows: list[Row] = []
        ctx = mp.get_context("spawn")
        agreement = []
        for n in counts:
            data_root = subset_root(root, tmp, n)
            result = {}
            for which in ("ours", "base"):
                out = tmp / f"{which}{n}.csv"
                # a non-daemonic worker process: ours starts DataLoader workers itself
                with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                    job = pool.submit(
                        _run,
                        which,
                        str(tmp),
                        str(root),
                        str(data_root),
                        str(out),
                        torch.get_num_threads(),
                    )
                    result[which] = job.result()
            (t_o, m_o, g_o), (t_b, m_b, _) = result["ours"], result["base"]
            rows.append(
                Row(
                    f"{n} images: time per image",
                    t_o / n,
                    t_b / n,
                    "s",
                    higher_is_better=False,
                    target=1.0,
                )
            )
            rows.append(Row(f"{n} images: peak RSS", m_o, m_b, "MiB"))
            if g_o == g_o:
                print(f"{n} images: peak GPU memory (ours) {g_o:.2f} GiB")
            pair = (tmp / f"ours{n}.csv", tmp / f"base{n}.csv")
            agreement.append(
                compare_submissions(*pair, png_shapes(discover(data_root, "test"))).mean
            )
        print_table(
            "Ensemble inference, 2 models x 2 folds x hflip TTA: ours vs baseline loop", rows
        )
        peaks = [r.ours for r in rows if "peak" in r.what]
        print(
            f"our peak RSS from {counts[0]} to {counts[-1]} images: "
            + " -> ".join(f"{p:.0f} MiB" for p in peaks)
            + (" (flat)" if max(peaks) <= 1.2 * min(peaks) + 50 else " (GROWS)")
        )
        print(
            "Dice between our CSV and the baseline's: " + ", ".join(f"{a:.6f}" for a in agreement)
        )
    print_table("Window pass of a patch member: ours vs stored tiles", window_rows(args))


if __name__ == "__main__":
    sys.exit(main())
