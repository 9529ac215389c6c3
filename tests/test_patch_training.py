"""Patch training end to end, its checks, and progressive resizing (``train.init_from``).

One tiny run trains on 32 px patches of the 64 px cache; a recording hook on the model
shows what the network was fed in training, validation and inference."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bonecomp import engine, models
from bonecomp.checkpoint import load_checkpoint, save_checkpoint
from bonecomp.checks import check_config
from bonecomp.config import ConfigError
from bonecomp.data.annotations import load_annotation
from bonecomp.data.layout import discover
from bonecomp.distributed import Dist
from bonecomp.inference.ensemble import load_member
from bonecomp.inference.predict import predict_submission
from bonecomp.runs import RunError, ensemble_members
from bonecomp.testing import dense_truth, tiny_config
from bonecomp.training import fold as fold_module
from bonecomp.training import state as state_mod
from bonecomp.training.data import build_loaders, fold_split, prepare_cache
from bonecomp.training.fold import run_training
from bonecomp.training.state import build_state
from tests.test_bad_inputs import _one_error_line, _train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

PATCH = {
    "data.patch_size": 32, "infer.overlap": 0.5, "train.experiment": "patch", "train.epochs": 1,
    "train.average.last": 1,  # averaged.pt is validated like best.pt: in windows
}  # fmt: skip
ENSEMBLE = {"infer.ensemble": [{"experiment": "patch", "folds": [0]}]}


def _recording(seen: list):
    """``create_model`` whose models log (training?, input shape) of every forward."""

    def create(cfg_model):
        net = models.create_model(cfg_model)
        net.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].shape)))
        return net

    return create


@pytest.fixture(scope="module")
def patch_run(tiny_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("patch")
    cfg = tiny_config(tiny_root, work, **PATCH, **ENSEMBLE)
    seen: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(state_mod, "create_model", _recording(seen))
        result = run_training(cfg, 0, progress=False)
    return cfg, result, seen


def test_training_sees_patches_and_validation_sees_windows_of_them(patch_run):
    _, result, seen = patch_run
    train = {tuple(s[-2:]) for t, s in seen if t}
    val = {tuple(s[-2:]) for t, s in seen if not t}
    assert train == {(32, 32)}  # patches of data.patch_size, never the 64 px image
    assert val == {(32, 32)}  # the 64 px validation images, as 32 px windows
    assert (result.run_dir / "averaged.pt").is_file()  # its validation is in `val` too
    summary = pd.read_csv(result.run_dir / "summary.csv")
    assert summary["val_dice"].notna().all()


def test_the_checkpoint_names_its_geometry_and_inference_uses_it(patch_run, tmp_path, monkeypatch):
    cfg, result, _ = patch_run
    ckpt = load_checkpoint(result.run_dir / "best.pt")
    assert ckpt["input_size"] == 64 and ckpt["patch_size"] == 32
    member = load_member(result.run_dir / "best.pt")
    assert (member.input_size, member.patch_size) == (64, 32)
    seen: list = []
    from bonecomp.inference import ensemble as ensemble_mod

    monkeypatch.setattr(ensemble_mod, "create_model", _recording(seen))
    cfg.infer.overlap = 0.5  # 64 px in 32 px windows at stride 16: 3 x 3 per image
    res = predict_submission(cfg, ensemble_members(cfg), tmp_path / "sub.csv", progress=False)
    assert res.report.ok and res.rows == 4 * 29
    assert {tuple(s[-2:]) for _, s in seen} == {(32, 32)}
    # 4 test images, 9 windows each, once per TTA view
    assert sum(s[0] for _, s in seen) == 4 * 9 * len(res.views)


def test_an_older_checkpoint_without_the_geometry_takes_it_from_its_config(patch_run, tmp_path):
    _, result, _ = patch_run
    ckpt = load_checkpoint(result.run_dir / "best.pt")
    del ckpt["patch_size"]  # as written before patch training existed
    save_checkpoint(tmp_path / "old.pt", {k: v for k, v in ckpt.items() if k != "format"})
    assert load_member(tmp_path / "old.pt").patch_size == 32
    ckpt["config"]["data"].pop("patch_size")  # and a config from before the key
    save_checkpoint(tmp_path / "older.pt", {k: v for k, v in ckpt.items() if k != "format"})
    assert load_member(tmp_path / "older.pt").patch_size is None  # whole image, as then


def test_val_overlap_reaches_validation_and_resume_keeps_it(tiny_root, tmp_path, monkeypatch):
    """``train.val_overlap`` is the overlap of every validation's windows (best.pt's and
    averaged.pt's), not ``infer.overlap``; ``--resume`` refuses to change it in one line
    naming it, and a resume that changes ``infer.overlap`` validates as before."""
    seen: list[tuple[int, float]] = []
    real_sliding = engine.sliding_window

    def recording(forward, image, window, overlap):
        seen.append((window, overlap))
        return real_sliding(forward, image, window, overlap)

    real_train, trained = fold_module.train_one_epoch, []

    def killed_in_epoch_1(*args, **kwargs):
        trained.append(1)
        if len(trained) == 2:
            raise KeyboardInterrupt  # last.pt is epoch 0's
        return real_train(*args, **kwargs)

    def config(**extra):
        keys = {**PATCH, "train.epochs": 2, "train.val_overlap": 0.5, "infer.overlap": 0.25}
        return tiny_config(tiny_root, tmp_path, **{**keys, **extra})

    monkeypatch.setattr(engine, "sliding_window", recording)
    monkeypatch.setattr(fold_module, "train_one_epoch", killed_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run_training(config(), 0, progress=False)
    assert seen and set(seen) == {(32, 0.5)}  # epoch 0's validation
    monkeypatch.setattr(fold_module, "train_one_epoch", real_train)
    with pytest.raises(RunError) as e:
        run_training(config(**{"train.val_overlap": 0.75}), 0, resume=True, progress=False)
    assert "\n" not in str(e.value) and "train.val_overlap: 0.5 -> 0.75" in str(e.value)
    seen.clear()
    result = run_training(config(**{"infer.overlap": 0.75}), 0, resume=True, progress=False)
    assert result.epochs_done == 2 and result.averaged_dice is not None
    assert seen and set(seen) == {(32, 0.5)}  # epoch 1's and averaged.pt's validations


# ------------------------------------------------------------------ progressive resizing
def test_init_from_starts_a_larger_run_from_the_source_weights(patch_run, tiny_root, tmp_path):
    _, result, _ = patch_run
    src = result.run_dir / "best.pt"
    cfg = tiny_config(tiny_root, tmp_path, **{"data.image_size": 96, "train.init_from": str(src)})
    check_config(cfg)
    state = build_state(cfg, torch.device("cpu"), state_mod.Dist(), 4, progress=False)
    want = load_checkpoint(src)["model"]
    got = state.model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    fresh = build_state(
        tiny_config(tiny_root, tmp_path), torch.device("cpu"), state_mod.Dist(), 4, False
    )
    assert not all(torch.equal(fresh.model.state_dict()[k], want[k]) for k in want)
    # the run trains at the new size from there (no optimiser or schedule carried over)
    res = run_training(cfg, 0, progress=False)
    assert res.epochs_done == 2 and res.best_dice >= 0


def test_init_from_refuses_another_model_in_one_line(patch_run, tiny_root, tmp_path):
    _, result, _ = patch_run
    src = str(result.run_dir / "best.pt")
    for key, value, words in (
        ("model.arch", "fcn8s", ["model.arch 'unet' there, 'fcn8s' here"]),
        ("model.encoder", "resnet34", ["model.encoder 'tu-test_resnet' there, 'resnet34' here"]),
    ):
        cfg = tiny_config(tiny_root, tmp_path, **{"train.init_from": src, key: value})
        with pytest.raises(ConfigError) as e:
            check_config(cfg)
        assert e.value.key == "train.init_from" and src in str(e.value)
        assert all(w in str(e.value) for w in words), str(e.value)


def test_init_from_refuses_another_class_list_in_one_line(patch_run, tiny_root, tmp_path, capsys):
    _, result, _ = patch_run
    ckpt = load_checkpoint(result.run_dir / "best.pt")
    ckpt["classes"] = ckpt["classes"][:5]
    bad = tmp_path / "five.pt"
    save_checkpoint(bad, {k: v for k, v in ckpt.items() if k != "format"})
    assert _train(tiny_root, tmp_path, f"train.init_from={bad}") == 2
    _one_error_line(capsys.readouterr().err, ["train.init_from", str(bad), "5 classes", "29"])
    assert not (tmp_path / "cache").exists()  # refused before any work


@pytest.mark.parametrize(
    "extra, words",
    [
        (["data.patch_size=96"], ["data.patch_size=96", "larger than data.image_size=64"]),
        (["data.patch_size=40"], ["data.patch_size", "multiple of 32"]),
        (["data.patch_size=32", "data.crop=carpal"], ["data.patch_size=32", "data.crop=carpal"]),
        (["data.patch_balance=median"], ["data.patch_balance"]),
        (["train.init_from=/nowhere/best.pt"], ["train.init_from", "/nowhere/best.pt"]),
    ],
    ids=["larger", "stride", "crop", "balance", "missing"],
)
def test_bad_patch_settings_end_in_one_line_before_the_cache(
    tiny_root, tmp_path, capsys, extra, words
):
    assert _train(tiny_root, tmp_path, *extra) == 2
    _one_error_line(capsys.readouterr().err, words)
    assert not (tmp_path / "cache").exists()


def test_validation_batches_hold_the_pixels_of_a_training_batch(tiny_root, tmp_path):
    from bonecomp.training.data import val_batch_size

    def size(**extra):
        return val_batch_size(tiny_config(tiny_root, tmp_path, **extra))

    assert size(**{"train.batch_size": 8}) == 8  # whole images: the training batch
    assert size(**{"train.batch_size": 8, "data.patch_size": 32}) == 2  # 8 x 32^2 / 64^2
    assert size(**{"train.batch_size": 2, "data.patch_size": 32}) == 1  # at least one


# ------------------------------------------------------- the sampler's keys, in the batches
SAMPLED = {"data.image_size": 128, "data.patch_size": 32, "train.batch_size": 8}


@pytest.fixture(scope="module")
def centre_hits(tiny_root, tmp_path_factory):
    """``hits(**keys)``: (N, C) bool, which classes cover the centre of each of 1600
    training patches, and the fold's training images (``rel``), for the tiny recipe
    with ``keys`` set as a user sets them; the loaders are built as training builds them
    (``prepare_cache`` + ``build_loaders``) and drawn epoch by epoch. Memoised per keys."""
    work = tmp_path_factory.mktemp("sampled")
    memo: dict = {}

    def hits(**keys) -> tuple[torch.Tensor, list[str]]:
        key = tuple(sorted(keys.items()))
        if key not in memo:
            cfg = tiny_config(tiny_root, work, **SAMPLED, **keys)
            folds, cache = prepare_cache(cfg, discover(tiny_root, "train"), Dist(), False)
            data = build_loaders(cfg, cache, *fold_split(folds, 0))
            h = cfg.data.patch_size // 2
            out = []
            for epoch in range(200):
                data.start_epoch(cfg.train.seed, epoch, 0)
                for batch in data.train_loader:  # soft masks: coverage 0..255
                    out.append(batch["mask"][:, :, h - 1 : h + 1, h - 1 : h + 1].amax((2, 3)) > 127)
            rels = cache.index["rel"].iloc[data.train_idx].tolist()
            memo[key] = torch.cat(out), rels
        return memo[key]

    return hits


def test_patch_foreground_is_the_share_of_training_patches_centred_on_a_bone(
    centre_hits, tiny_root
):
    share = {
        f: centre_hits(**{"data.patch_foreground": f})[0].any(1).float().mean().item()
        for f in (0.0, 0.5, 1.0)
    }
    # placed uniformly, a patch's centre is on bone as often as bone covers the middle of
    # the image (the centres' range), measured on the truth drawn by OpenCV (augmentation
    # moves it a little)
    table = discover(tiny_root, "train")
    on_bone = [dense_truth(load_annotation(j), (128, 128)).any(0)[16:112, 16:112].mean()
               for j in table["json_path"]]  # fmt: skip
    assert share[0.0] == pytest.approx(np.mean(on_bone), abs=0.05)
    assert share[1.0] > 0.95  # every patch centred on a bone
    assert share[0.5] == pytest.approx((share[0.0] + share[1.0]) / 2, abs=0.05)  # half and half


def test_patch_balance_decides_which_bones_the_training_patches_are_centred_on(
    centre_hits, tiny_root
):
    """``area`` draws a bone with weight 1 / sqrt(its mean area), ``uniform`` every bone
    alike: per class, the ratio of the two counts falls with the area at the power -1/2
    (how often a centred patch's centre pixels land on its bone cancels in the ratio)."""
    counts = {}
    for balance in ("area", "uniform"):
        hits, rels = centre_hits(**{"data.patch_foreground": 1.0, "data.patch_balance": balance})
        hits = hits.float()
        counts[balance] = (hits / hits.sum(1, keepdim=True).clamp(min=1)).sum(0).numpy()
    table = discover(tiny_root, "train").set_index("rel").loc[rels]
    areas = np.stack([dense_truth(load_annotation(j), (128, 128)).sum((1, 2))
                      for j in table["json_path"]]).astype(float)  # fmt: skip
    mean_area = areas.sum(0) / np.maximum((areas > 0).sum(0), 1)
    assert (mean_area > 0).all() and (counts["uniform"] > 0).all()
    slope = np.polyfit(np.log(mean_area), np.log(counts["area"] / counts["uniform"]), 1)[0]
    assert slope == pytest.approx(-0.5, abs=0.2)  # ignoring the key: 0
