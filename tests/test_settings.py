"""Settings followed from where the user sets them to where they land.

Each test loads the demo recipe with dotted overrides (as ``scripts/train.py k=v`` does)
and observes the effect where training meets it: the model, optimiser and step context
``build_state`` gives training, the training loader's batches (``prepare_cache`` +
``build_loaders``, as ``run_training`` builds them), the loss training builds
(``build_loss(cfg.loss)``), and, for the optimiser and schedule, tiny real runs (their
``summary.csv`` and checkpoints). Expected values come from the documented meaning of
each key, never from the code under test. The table of every key and its test:
docs/testing.md.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.model_selection import GroupKFold
from torch import nn

from bonecomp.checkpoint import load_checkpoint
from bonecomp.classes import CARPALS
from bonecomp.data.images import read_image
from bonecomp.data.layout import discover
from bonecomp.distributed import Dist
from bonecomp.engine import to_device
from bonecomp.losses import build_loss
from bonecomp.testing import tiny_config
from bonecomp.training import fold as fold_module
from bonecomp.training import run_training
from bonecomp.training.data import build_loaders, fold_split, prepare_cache
from bonecomp.training.state import build_state

CPU = torch.device("cpu")


def _state(tiny_root, work, **keys):
    """What training builds from the config: model, optimiser, schedule, EMA, step context."""
    return build_state(tiny_config(tiny_root, work, **keys), CPU, Dist(), 2, progress=False)


# ----------------------------------------------------------------------------- model
def test_the_model_keys_shape_the_model_training_builds(tiny_root, tmp_path):
    unet = _state(
        tiny_root, tmp_path, **{"model.init_bias": -2.5, "model.encoder": "resnet18"}
    ).model
    assert type(unet.net).__name__ == "Unet"
    bias = unet.output_bias
    assert bias.shape == (29,) and torch.equal(bias, torch.full((29,), -2.5))
    # resnet18 has two blocks in its first stage, resnet34 three (He et al., 2016)
    assert len(unet.net.encoder.layer1) == 2
    deeper = _state(tiny_root, tmp_path, **{"model.encoder": "resnet34"}).model
    assert len(deeper.net.encoder.layer1) == 3
    assert not torch.equal(deeper.output_bias, bias)  # the default prior, -4
    for upsample, learned in (("bilinear", False), ("learned", True)):
        fcn = _state(tiny_root, tmp_path, **{"model.arch": "fcn8s",
                                            "model.fcn_upsample": upsample}).model  # fmt: skip
        assert type(fcn.net).__name__ != "Unet"
        transposed = [m for m in fcn.modules() if isinstance(m, nn.ConvTranspose2d)]
        assert bool(transposed) == learned, upsample


def test_encoder_weights_from_a_file_start_the_training_model(tiny_root, tmp_path):
    donor = _state(tiny_root, tmp_path, **{"train.seed": 5}).model.net.encoder.state_dict()
    path = tmp_path / "encoder.pth"
    torch.save({f"encoder.{k}": v for k, v in donor.items()}, path)
    model = _state(tiny_root, tmp_path, **{"model.encoder_weights": str(path)}).model
    got = model.net.encoder.state_dict()
    assert all(torch.equal(got[k], v) for k, v in donor.items())
    plain = _state(tiny_root, tmp_path).model.net.encoder.state_dict()  # seed 42, no file
    assert not all(torch.equal(plain[k], v) for k, v in donor.items())


def test_the_seed_decides_the_initial_weights(tiny_root, tmp_path):
    def weights(seed: int) -> list[torch.Tensor]:
        return list(_state(tiny_root, tmp_path, **{"train.seed": seed}).model.parameters())

    a, again, other = weights(1), weights(1), weights(2)
    assert all(torch.equal(x, y) for x, y in zip(a, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, other, strict=True))


def test_channels_last_and_ema_reach_the_training_step(tiny_root, tmp_path):
    on = _state(tiny_root, tmp_path, **{"train.channels_last": True, "train.ema": 0.9})
    conv = next(m for m in on.model.modules() if isinstance(m, nn.Conv2d))
    assert on.ctx.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert on.ctx.ema is on.ema and on.ema.decay == 0.9
    assert on.eval_model is on.ema.module  # validated and saved as best.pt: the EMA
    off = _state(tiny_root, tmp_path, **{"train.channels_last": False})
    assert not off.ctx.channels_last and off.ema is None and off.ctx.ema is None
    auto = _state(tiny_root, tmp_path)  # auto: CUDA only
    conv = next(m for m in auto.model.modules() if isinstance(m, nn.Conv2d))
    assert not auto.ctx.channels_last and conv.weight.is_contiguous()


# ------------------------------------------------------------------------------ loss
def _loss(tiny_root, work, **keys):
    """The loss training builds from the config, on known logits and targets."""
    cfg = tiny_config(tiny_root, work, **keys)
    torch.manual_seed(0)
    logits = torch.randn(2, 29, 8, 8)
    target = (torch.rand(2, 29, 8, 8) > 0.6).float()
    target[1, 3] = 0  # class 3 absent from image 1: per image and over the batch differ
    total, _ = build_loss(cfg.loss)(logits, {"mask": target})
    return total.item(), torch.sigmoid(logits), target, logits


def _soft_dice(p, t, smooth, dims):
    inter, denom = (p * t).sum(dims), p.sum(dims) + t.sum(dims)
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean().item()


def test_the_loss_settings_reach_the_loss_training_builds(tiny_root, tmp_path):
    for smooth, over_batch in ((0.0, True), (5.0, True), (1.0, False)):
        keys = {"loss.terms": {"dice": 1.0}, "loss.dice_smooth": smooth,
                "loss.dice_over_batch": over_batch}  # fmt: skip
        got, p, t, _ = _loss(tiny_root, tmp_path, **keys)
        # 1 - soft Dice per class over the batch (sum over images and pixels), or per
        # image and class, with the smoothing added to numerator and denominator
        want = _soft_dice(p, t, smooth, (0, 2, 3) if over_batch else (2, 3))
        assert got == pytest.approx(want, rel=1e-5), keys
    # focal with gamma 0 is the plain binary cross-entropy
    got, _, t, logits = _loss(tiny_root, tmp_path, **{"loss.terms": {"focal": 1.0},
                                                      "loss.focal_gamma": 0.0})  # fmt: skip
    assert got == pytest.approx(F.binary_cross_entropy_with_logits(logits, t).item(), rel=1e-5)
    gamma2, *_ = _loss(tiny_root, tmp_path, **{"loss.terms": {"focal": 1.0}})
    assert gamma2 < 0.7 * got  # the default gamma 2 down-weights the easy pixels
    # Tversky per class over the batch: 1 - TP / (TP + alpha FP + beta FN), classes averaged
    for alpha, beta in ((0.3, 0.7), (0.9, 0.1)):
        keys = {"loss.terms": {"tversky": 1.0}, "loss.tversky_alpha": alpha,
                "loss.tversky_beta": beta}  # fmt: skip
        got, p, t, _ = _loss(tiny_root, tmp_path, **keys)
        tp, fp, fn = ((p * t).sum((0, 2, 3)), (p * (1 - t)).sum((0, 2, 3)),
                      ((1 - p) * t).sum((0, 2, 3)))  # fmt: skip
        want = (1 - tp / (tp + alpha * fp + beta * fn)).mean().item()
        assert got == pytest.approx(want, rel=1e-4), keys


# ------------------------------------------------------------------------------ folds
def test_n_splits_fold_seed_and_cache_dir_reach_the_folds_training_uses(tiny_root, tmp_path):
    table = discover(tiny_root, "train")

    def folds(**keys) -> tuple[pd.DataFrame, object]:
        cfg = tiny_config(tiny_root, tmp_path / "w", **keys)
        got, cache = prepare_cache(cfg, table, Dist(), False)
        return got.set_index("image").loc[table["rel"], "fold"].to_numpy(), cache

    plain, cache = folds(**{"data.n_splits": 2, "data.cache_dir": str(tmp_path / "x")})
    assert cache.dir.parent.parent == tmp_path / "x"  # the cache and folds: data.cache_dir
    assert list((tmp_path / "x").glob("*/folds_2split_*.csv"))
    # null: scikit-learn's plain GroupKFold by patient, as documented
    want = np.zeros(len(table), int)
    for k, (_, val) in enumerate(GroupKFold(2).split(table, groups=table["patient"])):
        want[val] = k
    np.testing.assert_array_equal(plain, want)
    five = folds()[0]
    assert sorted(set(five)) == [0, 1, 2, 3, 4]  # the demo's 5 splits
    seeded = [folds(**{"data.fold_seed": s})[0] for s in (1, 1, 2, 3)]
    np.testing.assert_array_equal(seeded[0], seeded[1])  # a seed is one split
    assert any(not np.array_equal(seeded[0], other) for other in seeded[2:])  # others differ


# -------------------------------------------------------------------- training batches
OFF = {"data.augment": []}  # no augmentation: the items as cached


def aug(name: str, **args) -> dict:
    """``data.augment`` set to one transform, drawn every time unless ``p`` says otherwise."""
    return {"data.augment": [{"__class_fullname__": name, "p": 1.0, **args}]}


ZERO_AFFINE = {"translate_percent": [0.0, 0.0], "scale": [1.0, 1.0], "rotate": [0.0, 0.0]}


@pytest.fixture(scope="module")
def items(tiny_root, tmp_path_factory):
    """``items(**keys)``: {cache row: (image, mask)} of one epoch of fold 0's training
    loader for the tiny recipe with ``keys`` on top of ``OFF``, built as training builds
    it; and the cache's training rows' polygons frame (size 64)."""
    work = tmp_path_factory.mktemp("batches")
    table = discover(tiny_root, "train")

    def draw(**keys) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        cfg = tiny_config(tiny_root, work, **{**OFF, **keys})
        folds, cache = prepare_cache(cfg, table, Dist(), False)
        data = build_loaders(cfg, cache, *fold_split(folds, 0))
        data.start_epoch(cfg.train.seed, 0, 0)
        out = {}
        for batch in data.train_loader:
            for i, image, mask in zip(batch["index"].tolist(), batch["image"], batch["mask"],
                                      strict=True):  # fmt: skip
                out[i] = image.numpy(), mask.numpy()
        return out

    draw.tiny_root, draw.work = tiny_root, work  # type: ignore[attr-defined]
    return draw


def _same(a: dict, b: dict, part: int) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[i][part], b[i][part]) for i in a)


def test_each_augmentation_entry_reaches_the_training_batches(items):
    off = items()
    assert len(off) == 8  # fold 0's training images, each once
    for keys, axis in ((aug("HorizontalFlip"), -1), (aug("VerticalFlip"), -2)):
        flipped = items(**keys)
        for i, (image, mask) in off.items():  # always flipped, image and masks alike
            np.testing.assert_array_equal(flipped[i][0], np.flip(image, axis), err_msg=str(keys))
            assert (flipped[i][1] != np.flip(mask, axis)).mean() < 0.002, keys
    # an entry's p is read: 0 draws nothing, even with a rotation in its ranges
    assert _same(items(**aug("Affine", rotate=[30.0, 30.0], p=0.0)), off, 0)
    same = items(**aug("Affine", **ZERO_AFFINE))  # every range 0: the identity
    assert _same(same, off, 0) and _same(same, off, 1)
    carpals = list(CARPALS)  # in the middle of the image: never cut by its edge
    for arg, value in (("translate_percent", [0.1, 0.1]), ("scale", [1.3, 1.3]),
                       ("rotate", [30.0, 30.0])):  # fmt: skip
        moved = items(**aug("Affine", **{**ZERO_AFFINE, arg: value}))
        assert not _same(moved, off, 0) and not _same(moved, off, 1), arg
        area = {i: moved[i][1][carpals].sum() / off[i][1][carpals].sum() for i in off}
        if arg == "scale":  # scaled by 1.3 per side: the area by about 1.69
            assert all(1.4 < r < 1.8 for r in area.values()), area  # 64 px: edge pixels
        else:  # a shift or a rotation keeps the carpals' area
            assert all(abs(r - 1) < 0.05 for r in area.values()), (arg, area)
    # a warped transform moves image and masks; intensity only: the masks stay
    bent = items(**aug("GridDistortion", num_steps=4, distort_limit=0.4))
    assert not _same(bent, off, 0) and not _same(bent, off, 1)
    bright = aug("RandomBrightnessContrast", brightness_limit=0.3, contrast_limit=0.3)
    for keys in (bright, aug("CLAHE"), aug("RandomGamma", gamma_limit=[50, 60])):
        changed = items(**keys)
        assert not _same(changed, off, 0) and _same(changed, off, 1), keys
    flat = items(**aug("RandomBrightnessContrast", brightness_limit=0.0, contrast_limit=0.0))
    assert _same(flat, off, 0)


def test_soft_targets_and_soft_k_decide_the_mask_values_training_sees(items):
    """Coverage of k x k sub-samples per pixel: the stored values are round(255 j / k^2)."""
    for soft, k, allowed in ((False, 4, {0, 1}), (True, 1, {0, 255}),
                             (True, 2, {0, 64, 128, 191, 255})):  # fmt: skip
        keys = {"data.soft_targets": soft, "data.soft_k": k}
        got = items(**keys)
        masks = np.stack([m for _, m in got.values()])
        assert set(np.unique(masks).tolist()) == allowed, (keys, np.unique(masks))
        # the targets the training step computes the loss on: coverage in [0, 1], a
        # pixel inside a bone 1 (with soft_k 1 they were 1/255: the bug this found)
        ctx = _state(items.tiny_root, items.work, **keys).ctx
        batch = {"image": torch.zeros(len(masks), 64, 64, dtype=torch.uint8),
                 "mask": torch.from_numpy(masks)}  # fmt: skip
        target = to_device(batch, ctx)["mask"]
        assert target.min() == 0 and target.max() == 1, keys
    k4 = items(**{"data.soft_k": 4})
    values = set(np.unique(np.concatenate([m.ravel() for _, m in k4.values()])).tolist())
    assert {0, 255} < values <= {round(255 * j / 16) for j in range(17)}


def test_the_carpal_crop_keys_reach_the_training_batches(items):
    """``data.crop=carpal``: items are the carpal box, grown by ``data.crop_margin`` per
    side; ``data.crop_jitter`` moves the box at random in training (0: never)."""
    carpals = list(CARPALS)
    whole = items()
    crop = {"data.crop": "carpal", "data.crop_jitter": 0.0}
    crops = {m: items(**crop, **{"data.crop_margin": m}) for m in (0.1, 0.6)}
    for i, (image, mask) in crops[0.1].items():
        assert image.shape == whole[i][0].shape  # the box resized to data.image_size
        share = mask[carpals].sum() / mask.sum()
        assert share > 2 * whole[i][1][carpals].sum() / whole[i][1].sum()  # zoomed in
        # a wider margin: the same carpals smaller, at (1 + 2 x 0.1) / (1 + 2 x 0.6) of the side
        ratio = crops[0.6][i][1][carpals].sum() / mask[carpals].sum()
        assert ratio == pytest.approx((1.2 / 2.2) ** 2, rel=0.25)
    other_seed = items(**crop, **{"data.crop_margin": 0.1, "train.seed": 7})
    assert _same(other_seed, crops[0.1], 0)  # no jitter: the same box whatever the draw
    jittered = items(**{**crop, "data.crop_margin": 0.1, "data.crop_jitter": 0.3})
    assert not _same(jittered, crops[0.1], 0)


# ------------------------------------------------------------------ optimiser and schedule
SMALL = {"data.image_size": 32, "train.oof_size": 16, "train.save_oof": False}  # quicker
RUNS = {
    # sgd with momentum and weight decay; lr x 0.5 after every epoch; two loader batches
    # (8 images, 4 per batch) per update: one update per epoch
    "step": {"train.optimizer": "sgd", "train.momentum": 0.8, "train.weight_decay": 0.01,
             "train.scheduler": "step", "train.lr": 0.02, "train.warmup_epochs": 0.0,
             "train.decay_epochs": 1.0, "train.decay_rate": 0.5, "train.accum_steps": 2},
    # a warm-up over 2 of 3 epochs (4 of 6 updates) from min_lr, then poly of power 2;
    # validation every 2 epochs (and after the last)
    "poly": {"train.scheduler": "poly", "train.poly_power": 2.0, "train.lr": 0.01,
             "train.min_lr": 0.001, "train.warmup_epochs": 2.0, "train.epochs": 3,
             "train.val_every": 2},
    # plain sgd at lr 1 with the gradient norm clipped to 1e-4, from the step run's
    # weights; plateau halves the lr after one validation without a better Dice
    "plateau": {"train.optimizer": "sgd", "train.momentum": 0.0, "train.weight_decay": 0.0,
                "train.scheduler": "plateau", "train.lr": 1.0, "train.warmup_epochs": 0.0,
                "train.patience_epochs": 0, "train.decay_rate": 0.5, "train.epochs": 3,
                "train.grad_clip": 1e-4},
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_root, tmp_path_factory) -> dict[str, tuple[pd.DataFrame, dict]]:
    """The three tiny runs of ``RUNS``: {name: (summary.csv, last.pt)}; the plateau run
    starts from the step run's best.pt and sees a validation Dice of 0.5 every time."""
    work = tmp_path_factory.mktemp("runs")
    out = {}
    for name, keys in RUNS.items():
        if name == "plateau":
            keys = {**keys, "train.init_from": str(work / "runs" / "step" / "fold0" / "best.pt")}
        cfg = tiny_config(tiny_root, work, **{"train.experiment": name, **SMALL, **keys})
        with pytest.MonkeyPatch.context() as mp:
            if name == "plateau":
                real = fold_module.validate

                def flat(*args, real=real, **kw):
                    val = real(*args, **kw)
                    val.metrics["dice"] = 0.5
                    return val

                mp.setattr(fold_module, "validate", flat)
            result = run_training(cfg, 0, progress=False)
        out[name] = (
            pd.read_csv(result.run_dir / "summary.csv"),
            load_checkpoint(result.run_dir / "last.pt"),
        )
    out["step_best"] = None, load_checkpoint(work / "runs" / "step" / "fold0" / "best.pt")
    out["step_files"] = None, {p.name for p in (work / "runs" / "step" / "fold0").iterdir()}
    return out


def test_the_optimiser_keys_reach_the_optimiser_training_steps(runs):
    summary, last = runs["step"]
    group = last["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.8 and group["weight_decay"] == 0.01
    assert "nesterov" in group and "betas" not in group  # SGD, not the default AdamW
    assert summary["lr"].tolist() == pytest.approx([0.01, 0.005])  # 0.02 x 0.5 per epoch
    assert last["progress"]["num_updates"] == 2  # one update of two batches per epoch
    files = runs["step_files"][1]  # train.save_oof false: no out-of-fold maps
    assert "best.pt" in files and not {"oof.npy", "oof_index.csv"} & files


def test_warmup_min_lr_poly_and_val_every_reach_the_run(runs):
    """Linear warm-up from min_lr over 4 updates, then min_lr + (lr - min_lr) x
    (1 - t / T)^2 over the run's T = 6 updates, reaching min_lr at the end."""
    summary, last = runs["poly"]
    lr, floor = 0.01, 0.001
    want = [floor + (lr - floor) * 2 / 4, floor + (lr - floor) * (1 - 4 / 6) ** 2, floor]
    assert summary["lr"].tolist() == pytest.approx(want)
    assert summary["val_dice"].isna().tolist() == [True, False, False]  # epochs 1 and 2
    assert last["progress"]["num_updates"] == 6


def test_grad_clip_bounds_each_step_and_plateau_patience_decays_the_lr(runs):
    summary, last = runs["plateau"]
    # validations of epochs 0 and 1 give 0.5: no gain at epoch 1, patience 0: halved
    assert summary["lr"].tolist() == pytest.approx([1.0, 1.0, 0.5])
    start = runs["step_best"][1]["model"]
    weights = [n for n, v in start.items() if v.is_floating_point() and "running_" not in n]
    moved = torch.sqrt(sum(((last["model"][n].double() - start[n].double()) ** 2).sum()
                           for n in weights))  # fmt: skip
    # plain SGD moves the weights by lr x the clipped gradient: at most
    # (1 + 1 + 0.5) x 2 updates per epoch x 1e-4 in all
    assert 0 < moved <= 2 * 2.5 * 1e-4 * (1 + 1e-6)


def test_the_preprocess_keys_reach_the_training_cache(tiny_root, tmp_path):
    """data.preprocess [clahe] with data.clahe_clip 3 and data.clahe_grid 4: the images
    training reads are OpenCV's CLAHE of each PNG at those settings, then resized."""
    from tests.test_preprocess import plain, reference

    table = discover(tiny_root, "train")
    keys = {"data.preprocess": ["clahe"], "data.clahe_clip": 3.0, "data.clahe_grid": 4}
    cfg = tiny_config(tiny_root, tmp_path, **keys)
    _, cache = prepare_cache(cfg, table, Dist(), False)
    for i in (0, len(cache) - 1):
        png = read_image(table.set_index("rel").loc[cache.index["rel"].iloc[i], "image_path"])
        np.testing.assert_array_equal(cache.image(i), reference(png, 64, 3.0, 4))
        assert not np.array_equal(cache.image(i), reference(png, 64, 2.0, 8))  # the defaults
        assert not np.array_equal(cache.image(i), plain(png, 64))
