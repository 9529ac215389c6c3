"""Pseudo-labels: the folder an ensemble writes (the cache's size and image resize, the
ensemble's probabilities), training that adds its images to the training part only
(never validation, OOF or folds), the sampler's weight under one process and DDP, the
rule, and one-line refusals of unusable folders."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from bonecomp.classes import NUM_CLASSES
from bonecomp.config import ConfigError, augment_from_preset
from bonecomp.data.augment import build_augmentation
from bonecomp.data.dataset import to_float_image
from bonecomp.data.images import read_image
from bonecomp.data.layout import discover
from bonecomp.data.patches import PatchSampler
from bonecomp.data.pseudo_dir import (
    PseudoDataset,
    PseudoError,
    PseudoWriter,
    open_pseudo,
    pseudo_target,
)
from bonecomp.distributed import Dist
from bonecomp.fileio import OutputError
from bonecomp.inference.ensemble import Ensemble, load_member
from bonecomp.inference.pseudo_labels import write_pseudo_labels
from bonecomp.inference.tta import views
from bonecomp.runs import OOF_EPOCH, PseudoDir, ensemble_members, run_dir
from bonecomp.testing import REPO as ROOT
from bonecomp.testing import assert_same_warp, tiny_config, tiny_overrides
from bonecomp.training import fold as fold_module
from bonecomp.training import run_training
from bonecomp.training.data import (
    MixSampler,
    build_loaders,
    fold_split,
    open_pseudo_labels,
    prepare_cache,
)
from tests.test_distributed import free_port

KEYS = {"train.epochs": 2}


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    """A tiny trained fold and its pseudo-labels at the training size (64 px)."""
    work = tmp_path_factory.mktemp("work")
    cfg = tiny_config(tiny_root, work, **KEYS)
    run_training(cfg, 0, progress=False)
    res = write_pseudo_labels(cfg, ensemble_members(cfg), work / "pseudo", progress=False)
    return cfg, work, res


def _pseudo_cfg(tiny_root, work, folder, **extra):
    keys = {**KEYS, "train.experiment": "tiny_pl", "train.pseudo_labels": str(folder), **extra}
    return tiny_config(tiny_root, work, **keys)


# ----------------------------------------------------------------------------- writing
@pytest.mark.parametrize("size", [64, 96])
def test_folder_has_the_cache_size_and_the_ensembles_probabilities(
    trained, tiny_root, tmp_path, size
):
    cfg, work, res = trained
    if size == 64:
        pseudo = open_pseudo(res.path)
    else:  # another size than the model's input: probabilities are interpolated to it
        cfg = tiny_config(tiny_root, work, **{**KEYS, "data.image_size": size})
        pseudo = open_pseudo(
            write_pseudo_labels(cfg, ensemble_members(cfg), tmp_path / "p", progress=False).path
        )
    test = discover(tiny_root, "test")
    assert pseudo.size == size and len(pseudo) == len(test) == 4
    assert pseudo.index["name"].tolist() == test["name"].tolist()
    assert pseudo.index["patient"].tolist() == test["patient"].tolist()
    assert pseudo.images.shape == (4, size, size) and pseudo.images.dtype == np.uint8
    assert pseudo.probs.shape == (4, NUM_CLASSES, size, size)
    assert (pseudo.index[["src_h", "src_w"]].to_numpy() == 128).all()

    # The ensemble run again by hand on image 1: same member, same views.
    member = load_member(run_dir(cfg, 0).best)
    ens = Ensemble([member], views(cfg.infer.tta, cfg.infer.scales))
    assert not ens.single_view  # two TTA views: probabilities
    src = read_image(test["image_path"].iloc[1])
    x = cv2.resize(src, (member.input_size,) * 2, interpolation=cv2.INTER_AREA)
    want = ens({member.input_size: to_float_image(torch.from_numpy(x)[None])})
    if size != member.input_size:
        want = torch.nn.functional.interpolate(want, (size, size), mode="bilinear")
    image, probs = pseudo.read(1)
    cached_way = cv2.resize(src, (size, size), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(image, cached_way)
    np.testing.assert_allclose(probs / 255, want[0].numpy(), atol=0.5 / 255 + 1e-6)
    assert probs.std() > 1  # not a constant map: the comparison can fail
    assert not np.array_equal(pseudo.read(0)[1], probs)
    assert pseudo.meta["thresholds"] == [0.5] * NUM_CLASSES
    assert pseudo.meta["members"][0]["checkpoint"] == str(run_dir(cfg, 0).best)


def test_script_writes_the_folder_and_refuses_a_foreign_one(trained, tiny_root, tmp_path, capsys):
    _, work, _ = trained
    sys.path.insert(0, str(ROOT / "scripts"))
    import pseudo_label as script

    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--quiet"]
    over = tiny_overrides(tiny_root, work, **KEYS)
    assert script.main([*args, "--out", str(tmp_path / "pl"), *over]) == 0
    assert "train.pseudo_labels=" in capsys.readouterr().out
    assert len(open_pseudo(tmp_path / "pl")) == 4
    assert script.main([*args, "--out", str(tmp_path / "pl"), *over]) == 0  # replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pl"]  # no temporary left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert script.main([*args, "--out", str(foreign), *over]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a pseudo-label folder" in err and len(err.splitlines()) == 1
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_an_interrupted_write_leaves_nothing(tmp_path):
    index = pd.DataFrame(
        {"rel": ["ID9/a.png"], "patient": ["ID9"], "name": ["a.png"], "src_h": [8], "src_w": [8]}
    )
    writer = PseudoWriter(tmp_path / "pl", index, 32)
    writer.add(0, np.zeros((32, 32), np.uint8), np.zeros((NUM_CLASSES, 32, 32)))
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    writer = PseudoWriter(tmp_path / "pl", pd.concat([index, index]), 32)
    writer.add(0, np.zeros((32, 32), np.uint8), np.zeros((NUM_CLASSES, 32, 32)))
    with pytest.raises(ValueError, match="1 rows never written"):
        writer.close({"thresholds": [0.5] * NUM_CLASSES})
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_disk_too_full_for_the_maps_is_one_line_before_any_write(tmp_path, monkeypatch):
    """The maps are memory-mapped: their blocks are reserved up front, so a full disk is an
    ``OutputError`` naming the folder (not a SIGBUS mid-write), and nothing is left."""
    index = pd.DataFrame(
        {"rel": ["ID9/a.png"], "patient": ["ID9"], "name": ["a.png"], "src_h": [8], "src_w": [8]}
    )

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    full_disk = r"cannot write probs\.npy in .*out/pl: the folder is on a full disk"
    with pytest.raises(OutputError, match=full_disk):
        PseudoWriter(tmp_path / "out" / "pl", index, 32)
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------- training
def test_pseudo_images_are_trained_on_and_never_validated(
    trained, tiny_root, tmp_path, monkeypatch
):
    cfg, work, res = trained
    pcfg = _pseudo_cfg(tiny_root, work, res.path)
    table = discover(tiny_root, "train")
    pseudo = open_pseudo_labels(pcfg, table)
    names = set(pseudo.index["name"])
    folds, cache = prepare_cache(pcfg, table, Dist(), False)
    for k in range(pcfg.data.n_splits):
        train_idx, val_idx = fold_split(folds, k)
        data = build_loaders(pcfg, cache, train_idx, val_idx, pseudo=pseudo)
        data.start_epoch(0, 0, 0)
        seen = torch.cat([b["index"] for b in data.train_loader]).tolist()
        val = torch.cat([b["index"] for b in data.val_loader]).tolist()
        n = len(cache)
        # weight 1: every real training image and every pseudo image once per epoch
        # (drop_last may leave out the last partial batch)
        full = sorted([*train_idx.tolist(), *range(n, n + len(pseudo))])
        assert set(seen) <= set(full) and len(seen) >= len(full) - pcfg.train.batch_size + 1
        assert len(set(seen)) == len(seen) and {i for i in seen if i >= n}
        assert sorted(val) == sorted(val_idx.tolist()) and max(val) < n
        assert not names & set(data.image_names(val))
        assert {f"pseudo {r}" for r in pseudo.index["rel"]} >= set(
            data.image_names([i for i in seen if i >= n])
        )

    batches = []
    real_epoch = fold_module.train_one_epoch

    def recording(model, loader, *args, **kw):
        batches.extend(b["index"] for b in loader)
        return real_epoch(model, loader, *args, **kw)

    monkeypatch.setattr(fold_module, "train_one_epoch", recording)
    run_training(pcfg, 0, progress=False)
    n = len(cache)
    assert any((b >= n).any() for b in batches)  # pseudo images went through training
    plain, with_pl = run_dir(cfg, 0), run_dir(pcfg, 0)
    oof = pd.read_csv(with_pl.oof_index)
    assert not names & set(oof["name"])  # validation / OOF never holds a pseudo image
    # folds unchanged (the best epoch, also in the index, may differ between the runs)
    same = [c for c in oof.columns if c != OOF_EPOCH]
    pd.testing.assert_frame_equal(oof[same], pd.read_csv(plain.oof_index)[same])
    assert np.load(with_pl.oof).shape == np.load(plain.oof).shape


def test_two_process_ddp_trains_with_pseudo_labels(trained, tiny_root, tmp_path):
    res = trained[2]
    keys = {"train.epochs": 1, "train.pseudo_labels": str(res.path), "train.pseudo_weight": 0.5}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", str(ROOT / "scripts" / "train.py"),
        "--config", str(ROOT / "configs" / "demo.yaml"), "--fold", "0", "--quiet",
        *tiny_overrides(tiny_root, tmp_path, **keys),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    oof = pd.read_csv(tmp_path / "runs" / "tiny" / "fold0" / "oof_index.csv")
    assert len(oof) == 2 and not set(open_pseudo(res.path).index["name"]) & set(oof["name"])


def test_mix_sampler_weight_and_ddp_shards():
    g = torch.Generator().manual_seed(0)
    half = list(MixSampler(6, 4, 0.5, g))
    assert len(half) == 8 and sorted(i for i in half if i < 6) == list(range(6))
    assert len({i for i in half if i >= 6}) == 2 and all(i < 10 for i in half)
    twice = list(MixSampler(6, 4, 2.0, g))
    assert sorted(twice) == sorted([*range(6), *range(6, 10), *range(6, 10)])
    ranks = [MixSampler(6, 4, 1.5, rank=r, world=3, seed=7) for r in range(3)]
    for s in ranks:
        s.set_epoch(2)
    shards = [list(s) for s in ranks]
    assert [len(s) for s in shards] == [4, 4, 4] == [len(s) for s in ranks]  # 12 drawn, 12 used
    drawn = sorted(i for s in shards for i in s)
    assert [i for i in drawn if i < 6] == list(range(6)) and len(drawn) == 12
    ranks[0].set_epoch(3)
    assert list(ranks[0]) != shards[0]  # a new order each epoch


def test_an_absurd_pseudo_weight_is_one_line_at_the_config_check(tiny_root, tmp_path, capsys):
    """``train.pseudo_weight=1e9`` grew the epoch's order to 16.6 GB and was killed by the
    kernel without a word: it is bounded, and the line says why (issue 29, case 11)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train as train_script

    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--fold", "0", "--quiet"]
    args += tiny_overrides(tiny_root, tmp_path, **{"train.pseudo_weight": 1e9})
    assert train_script.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: command line: train.pseudo_weight must be in (0, 10]: ")
    assert "\n" not in err and not (tmp_path / "runs").exists()
    most = list(MixSampler(6, 4, 10.0, torch.Generator().manual_seed(0)))  # the ceiling works
    assert sorted(most) == sorted([*range(6), *list(range(6, 10)) * 10])


def test_sharpen_snaps_confident_pixels_and_binary_targets_use_thresholds():
    p = np.array([0, 25, 26, 127, 229, 230, 255], np.uint8).reshape(1, 1, -1)
    assert pseudo_target(p, "soft", 0.9, True, [0.5]).tolist() == p.tolist()
    sharp = pseudo_target(p, "sharpen", 0.9, True, [0.5]).ravel().tolist()
    assert sharp == [0, 0, 26, 127, 229, 255, 255]  # 0.9 x 255 = 229.5, 0.1 x 255 = 25.5
    assert pseudo_target(p, "soft", 0.9, False, [0.45]).ravel().tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_dataset_targets_follow_the_rule_and_move_with_the_image(trained, tmp_path):
    _, _, res = trained
    # known probabilities rather than a tiny model's (which may stay under 0.5 everywhere)
    real = open_pseudo(res.path)
    rng = np.random.default_rng(0)
    writer = PseudoWriter(tmp_path / "known", real.index, real.size)
    for row in range(len(real)):
        writer.add(row, real.read(row)[0], rng.random((NUM_CLASSES, real.size, real.size)))
    pseudo = open_pseudo(writer.close({"thresholds": [0.5] * NUM_CLASSES}).path)
    image, probs = pseudo.read(0)
    soft = PseudoDataset(pseudo, None, "soft", offset=100)[0]
    assert soft["index"] == 100 and torch.equal(soft["mask"], torch.from_numpy(probs))
    hard = PseudoDataset(pseudo, None, soft=False)[0]["mask"].numpy()
    assert hard.any() and (~hard.astype(bool)).any()  # both values: the check can fail
    np.testing.assert_array_equal(hard, probs / 255 > 0.5)
    flip = build_augmentation(
        augment_from_preset(dict(hflip=1.0, affine_p=0, brightness_contrast_p=0))
    )
    item = PseudoDataset(pseudo, flip)[0]
    np.testing.assert_array_equal(item["mask"].numpy(), probs[:, :, ::-1])
    np.testing.assert_array_equal(item["image"].numpy(), image[:, ::-1])
    moved = PseudoDataset(pseudo, build_augmentation(augment_from_preset(dict(affine_p=1.0))))
    moved = moved[0]["mask"]
    assert moved.shape == (NUM_CLASSES, 64, 64) and moved.dtype == torch.uint8
    # patch training: a uniform 32 px cut of image and target, with the real items' keys
    sampler = PatchSampler(32, 0.0, np.ones(NUM_CLASSES))
    origins = set()
    for seed in range(6):
        np.random.seed(seed)  # noqa: NPY002  (no transform: the global state places it)
        cut = PseudoDataset(pseudo, None, "soft", patch=sampler)[0]
        y0, x0 = cut["origin"].tolist()
        origins.add((y0, x0))
        assert torch.equal(cut["mask"], soft["mask"][:, y0 : y0 + 32, x0 : x0 + 32])
        np.testing.assert_array_equal(cut["image"].numpy(), image[y0 : y0 + 32, x0 : x0 + 32])
    assert len(origins) > 1  # placed at random, not always the corner
    # augmented patches: only the window is warped, the crop of the whole warp (same seed)
    aug = augment_from_preset(dict(hflip=1.0, affine_p=1.0, rotate=25, brightness_contrast_p=1.0))
    whole_ds = PseudoDataset(pseudo, build_augmentation(aug))
    cut_ds = PseudoDataset(pseudo, build_augmentation(aug, patch=True), patch=sampler)
    for seed in range(4):
        whole_ds.transform.set_random_seed(seed)
        cut_ds.transform.set_random_seed(seed)
        a, b = whole_ds[0], cut_ds[0]
        y0, x0 = b["origin"].tolist()
        assert_same_warp(b["image"], a["image"][y0 : y0 + 32, x0 : x0 + 32], 0.01)
        assert_same_warp(b["mask"], a["mask"][:, y0 : y0 + 32, x0 : x0 + 32], 0.01)
        assert not torch.equal(b["mask"], soft["mask"][:, y0 : y0 + 32, x0 : x0 + 32])


# ------------------------------------------------------------------------------ refusals
def _refusal(cfg) -> str:
    cfg.train.experiment = "refused"
    with pytest.raises(ConfigError) as e:
        run_training(cfg, 0, progress=False)
    msg = str(e.value)
    assert "train.pseudo_labels" in msg and len(msg.splitlines()) == 1
    assert not run_dir(cfg, 0).path.exists()  # refused before the run folder is claimed
    return msg


def test_unusable_folders_are_refused_in_one_line(trained, tiny_root, tmp_path):
    _, work, res = trained
    assert "does not exist" in _refusal(_pseudo_cfg(tiny_root, work, tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert "not a pseudo-label folder" in _refusal(_pseudo_cfg(tiny_root, work, tmp_path / "empty"))
    other = _pseudo_cfg(tiny_root, work, res.path, **{"data.image_size": 96})
    assert "written at 64 px but data.image_size is 96" in _refusal(other)

    bad = tmp_path / "truncated"
    shutil.copytree(res.path, bad)
    with open(PseudoDir(bad).probs, "r+b") as f:
        f.truncate(1000)
    assert "probs.npy missing or truncated" in _refusal(_pseudo_cfg(tiny_root, work, bad))

    flipped = tmp_path / "flipped"
    shutil.copytree(res.path, flipped)
    with open(PseudoDir(flipped).probs, "r+b") as f:  # same size, damaged inside row 2
        f.seek(-(NUM_CLASSES * 64 * 64) - 17, 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    pseudo = open_pseudo(flipped)
    pseudo.read(1)
    with pytest.raises(PseudoError, match=r"flipped is damaged: row 2"):
        pseudo.read(2)

    train = discover(tiny_root, "train").iloc[:2]  # pseudo-labels of training images
    index = train[["rel", "patient", "name"]].assign(src_h=128, src_w=128)
    writer = PseudoWriter(tmp_path / "leak", index, 64)
    for i in range(2):
        writer.add(i, np.zeros((64, 64), np.uint8), np.zeros((NUM_CLASSES, 64, 64)))
    writer.close({"thresholds": [0.5] * NUM_CLASSES})
    leak = _refusal(_pseudo_cfg(tiny_root, work, tmp_path / "leak"))
    assert "holds training image(s)" in leak and train["name"].iloc[0] in leak


def test_train_script_refusal_is_one_line_exit_2(trained, tiny_root, tmp_path, capsys):
    _, work, _ = trained
    sys.path.insert(0, str(ROOT / "scripts"))
    import train as script

    keys = {**KEYS, "train.experiment": "x", "train.pseudo_labels": str(tmp_path / "none")}
    argv = ["--config", str(ROOT / "configs" / "demo.yaml"), "--quiet", "--fold", "0"]
    assert script.main(argv + tiny_overrides(tiny_root, work, **keys)) == 2
    err = capsys.readouterr().err.strip()
    assert "train.pseudo_labels" in err and "does not exist" in err
    assert len(err.splitlines()) == 1


# ------------------------------------------------------- the keys, in the training batches
NO_AUGMENT = {"data.augment": []}  # masks as stored
THRESHOLDS = [0.2 + 0.02 * c + 0.001 for c in range(NUM_CLASSES)]  # per class, off the grid


@pytest.fixture(scope="module")
def known_pseudo(tiny_root, tmp_path_factory):
    """A pseudo-label folder of the tiny test images at 64 px with random probabilities
    and per-class thresholds (no model needed), and a work folder for its runs."""
    work = tmp_path_factory.mktemp("known")
    test = discover(tiny_root, "test")
    index = test[["rel", "patient", "name"]].assign(src_h=128, src_w=128)
    rng = np.random.default_rng(0)
    writer = PseudoWriter(work / "pl", index, 64)
    for row, path in enumerate(test["image_path"]):
        image = cv2.resize(read_image(path), (64, 64), interpolation=cv2.INTER_AREA)
        writer.add(row, image, rng.random((NUM_CLASSES, 64, 64)))
    return writer.close({"thresholds": THRESHOLDS}).path, work


def _expected_target(stored: np.ndarray, rule: str, confidence: float, soft: bool) -> np.ndarray:
    """The target the docs promise for stored uint8 probabilities (written here, not taken
    from ``pseudo_target``): soft, sharpened, or each class's threshold."""
    p = stored.astype(np.float64) / 255
    if not soft:
        return (p > np.asarray(THRESHOLDS)[:, None, None]).astype(np.uint8)
    out = stored.copy()
    if rule == "sharpen":
        out[p >= confidence] = 255
        out[p <= 1 - confidence] = 0
    return out


@pytest.mark.parametrize(
    "rule, confidence, weight, soft",
    [("soft", 0.9, 1.0, True), ("sharpen", 0.75, 2.0, True), ("sharpen", 0.95, 0.5, True),
     ("soft", 0.9, 1.0, False)],
    ids=["soft", "sharpen-0.75-twice", "sharpen-0.95-half", "binary"],
)  # fmt: skip
def test_the_pseudo_rule_confidence_and_weight_reach_the_training_batches(
    known_pseudo, tiny_root, rule, confidence, weight, soft
):
    folder, work = known_pseudo
    keys = {
        **NO_AUGMENT, "train.pseudo_labels": str(folder), "train.pseudo_rule": rule,
        "train.pseudo_confidence": confidence, "train.pseudo_weight": weight,
        "data.soft_targets": soft, "train.batch_size": 2,  # 8 real + 2, 4 or 8 pseudo: no rest
    }  # fmt: skip
    cfg = tiny_config(tiny_root, work, **keys)
    table = discover(tiny_root, "train")
    pseudo = open_pseudo_labels(cfg, table)
    folds, cache = prepare_cache(cfg, table, Dist(), False)
    data = build_loaders(cfg, cache, *fold_split(folds, 0), pseudo=pseudo)
    n = len(cache)
    stored = [open_pseudo(folder).read(j)[1] for j in range(len(pseudo))]
    for epoch in range(2):
        data.start_epoch(cfg.train.seed, epoch, 0)
        drawn = []
        for batch in data.train_loader:
            for i, mask in zip(batch["index"].tolist(), batch["mask"], strict=True):
                if i >= n:
                    drawn.append(i - n)
                    want = _expected_target(stored[i - n], rule, confidence, soft)
                    np.testing.assert_array_equal(mask.numpy(), want, err_msg=f"pseudo row {i - n}")
        assert len(drawn) == round(weight * len(pseudo))  # pseudo items per epoch
        assert len(set(drawn)) == min(len(drawn), len(pseudo))  # each once, or twice each
        if weight == 2.0:
            assert sorted(drawn) == sorted([*range(len(pseudo))] * 2)
    sharp = _expected_target(stored[0], rule, confidence, soft)
    assert ((sharp != stored[0]).mean() > 0.05) == (rule == "sharpen" or not soft)  # can fail
